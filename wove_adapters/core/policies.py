"""Delivery policies resolved for one task, and what an executor says it can honour.

The runtime resolves a ``DeliveryPolicy`` per run from the task's settings and checks it
against the executor's declared ``Capabilities`` when the environment starts, so an
impossible policy (``require_ack`` where cancellation cannot be confirmed) is a start-up
error, not a surprise at 3 a.m.
"""

from __future__ import annotations

import contextlib
import enum
import math
import string
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from wove_adapters.core.errors import UnsupportedPolicyError
from wove_adapters.core.frames import CANCEL_MODES, ORPHAN_POLICIES


class RunState(str, enum.Enum):
    """The one vocabulary for where a run stands, whoever is asked.

    - a backend about its job: adapters map native states into PENDING, RUNNING,
      SUCCEEDED, FAILED, CANCELLED, GONE (the backend no longer knows the job) or UNKNOWN;
    - the ledger about its record: SUBMITTED, RUNNING, then one of SUCCEEDED, FAILED,
      CANCELLED, LOST, or DETACHED (stored as the plain values, see ``core.ledger.base``);
    - a worker about its outcome: SUCCEEDED, FAILED, CANCELLED, or REFUSED (the payload
      did not verify);
    - a terminal event frame: ``of_event``.

    Members compare and hash as their values, so ``"succeeded"`` read back from a
    database, JSON or another process is the same key as ``RunState.SUCCEEDED``.
    """

    SUBMITTED = "submitted"
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REFUSED = "refused"
    LOST = "lost"
    DETACHED = "detached"
    GONE = "gone"
    UNKNOWN = "unknown"

    def __hash__(self) -> int:
        return str.__hash__(self)

    def __str__(self) -> str:
        return str(self.value)

    @property
    def finished(self) -> bool:
        """The job or run will not change any more (a backend's GONE included)."""
        return self in _FINISHED

    @classmethod
    def of_event(cls, frame_type: str) -> RunState:
        """The state a terminal event (``task_result``, ``task_error``,
        ``task_cancelled``) ends a run in; any other event leaves it RUNNING."""
        return _OF_EVENT.get(frame_type, cls.RUNNING)


_FINISHED = frozenset({
    RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.REFUSED,
    RunState.LOST, RunState.GONE,
})
_OF_EVENT = {
    "task_result": RunState.SUCCEEDED,
    "task_error": RunState.FAILED,
    "task_cancelled": RunState.CANCELLED,
}

# The name adapters use: a backend's view of its job (a subset of RunState).
JobState = RunState


def map_state(table: Mapping[str, JobState], native: object) -> JobState:
    """Translate a backend's state at the boundary; anything unmapped is UNKNOWN."""
    return (
        table.get(str(native).upper(), JobState.UNKNOWN) if native is not None else JobState.UNKNOWN
    )


@dataclass(frozen=True)
class Capabilities:
    """What an executor or adapter can really do. Declared honestly; the conformance
    suite checks each claim against the real backend."""

    cancel_queued: bool = False
    cancel_running: bool = False
    confirm_cancel: bool = False  # can honour require_ack
    native_idempotency: bool = False
    native_result: bool = False
    status: bool = False  # can report job state for reconciliation
    requeue: bool = True
    detach: bool = False  # a run can outlive the caller and report to the ledger
    heartbeats: bool = True
    inline_payload_limit: int = 256 * 1024
    array_jobs: bool = False
    chunks: bool = False  # the worker runs several runs of a mapped call in one job

    @classmethod
    def backend(cls, **differences: Any) -> Capabilities:
        """What a job-system adapter usually has: queued work can be removed, the job's
        state read (so reconciliation works), runs requeued and left running after the
        caller detaches, results taken from our return path rather than the backend. An
        adapter names only how it differs, so the differences are what a reader sees."""
        usual: dict[str, Any] = dict(
            cancel_queued=True, status=True, requeue=True, detach=True, native_result=False
        )
        return cls(**{**usual, **differences})


CONCURRENCY_MODES = ("unlimited", "task", "arguments", "keys")


def _mode(value: Any, key: str, where: str) -> str:
    mode = str(value or "unlimited")
    mode = "arguments" if mode == "argument" else mode  # the seed's singular, accepted
    if mode not in CONCURRENCY_MODES:
        raise ValueError(
            f"{where} has invalid {key} {value!r}; allowed: {', '.join(CONCURRENCY_MODES)}"
        )
    return mode


def _names(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return tuple(str(part) for part in value)


@dataclass(frozen=True)
class TaskControls:
    """Per-task controls the dispatcher keeps through the ledger (docs/task-controls.md):
    how many runs of a task may execute or be registered at once, result reuse, which
    errors are retried. Resolved like every other setting, once per task and call."""

    concurrency: str = "unlimited"  # unlimited | task | arguments | keys
    registration: str = "unlimited"
    key_arguments: tuple[str, ...] = ()
    reroute: bool = False
    lease_seconds: float = 15.0
    cache: bool = False
    cache_ignore: tuple[str, ...] = ()
    cache_ttl: float | None = None
    raise_on_diff: bool = False
    retry_for: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        """Whether the dispatcher has anything to do for this task beyond delivery."""
        return self.cache or self.concurrency != "unlimited" or self.registration != "unlimited"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str = "task") -> TaskControls:
        controls = cls(
            concurrency=_mode(settings.get("concurrency_control"), "concurrency_control", where),
            registration=_mode(
                settings.get("registration_concurrency"), "registration_concurrency", where
            ),
            key_arguments=_names(settings.get("key_arguments")),
            reroute=bool(settings.get("reroute_on_concurrency_control")),
            lease_seconds=_seconds(
                settings.get("concurrency_lease_seconds"), "concurrency_lease_seconds", where
            ) or 15.0,
            cache=bool(settings.get("cache_results")),
            cache_ignore=_names(settings.get("disable_cache_args")),
            cache_ttl=_seconds(settings.get("cache_ttl_seconds"), "cache_ttl_seconds", where),
            raise_on_diff=bool(settings.get("on_diff_non_key_args_raise")),
            retry_for=_names(settings.get("retry_for")),
        )
        if "keys" in (controls.concurrency, controls.registration) and not controls.key_arguments:
            raise ValueError(
                f"{where}: concurrency mode 'keys' needs key_arguments, the names of the "
                f"arguments whose values identify a run (e.g. key_arguments=['user_id'])"
            )
        return controls


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout: float | None = None
    idempotency_key: Any = None  # literal, format string, or callable (unresolved)
    cancel_mode: str = "best_effort"
    heartbeat_seconds: float | None = None
    max_in_flight: int | None = None
    orphan_policy: str = "cancel"
    max_requeues: int = 3
    cancel_ack_timeout: float = 10.0
    # A launched attempt with no event from its worker within this many seconds is lost.
    max_pending_seconds: float | None = None
    controls: TaskControls = TaskControls()
    # Task logs (docs/observability.md, "Logs"): the level of the task's logging records
    # its worker sends home (None: off), and whether its stdout/stderr lines go too.
    task_logs: str | None = None
    task_output: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str = "task") -> DeliveryPolicy:
        cancel_mode = settings.get("delivery_cancel_mode") or "best_effort"
        if cancel_mode not in CANCEL_MODES:
            raise ValueError(
                f"{where} has invalid delivery_cancel_mode {cancel_mode!r}; "
                f"allowed: {', '.join(CANCEL_MODES)}"
            )
        orphan = settings.get("delivery_orphan_policy") or "cancel"
        if orphan not in ORPHAN_POLICIES:
            raise ValueError(
                f"{where} has invalid delivery_orphan_policy {orphan!r}; "
                f"allowed: {', '.join(ORPHAN_POLICIES)}"
            )
        executor_config = settings.get("executor_config") or {}
        return cls(
            timeout=_positive(settings.get("delivery_timeout")),
            idempotency_key=settings.get("delivery_idempotency_key"),
            cancel_mode=cancel_mode,
            heartbeat_seconds=_positive(settings.get("delivery_heartbeat_seconds")),
            max_in_flight=settings.get("delivery_max_in_flight") or None,
            orphan_policy=orphan,
            max_requeues=int(executor_config.get("max_requeues", 3)),
            cancel_ack_timeout=float(executor_config.get("cancel_ack_timeout", 10.0)),
            max_pending_seconds=_seconds(
                settings.get("delivery_max_pending_seconds")
                if settings.get("delivery_max_pending_seconds") is not None
                else settings.get("max_pending_seconds"),  # the seed's name
                "delivery_max_pending_seconds",
                where,
            ),
            controls=TaskControls.from_settings(settings, where),
            task_logs=task_logs_level(settings.get("task_logs"), where),
            task_output=_flag(settings.get("task_output"), "task_output", where),
        )

    def as_delivery(self, key: str | None) -> dict[str, Any]:
        """The ``delivery`` dict of a run_task frame (wove's shape)."""
        delivery = {
            "delivery_timeout": self.timeout,
            "delivery_idempotency_key": key,
            "delivery_cancel_mode": self.cancel_mode,
            "delivery_heartbeat_seconds": self.heartbeat_seconds,
            "delivery_orphan_policy": self.orphan_policy,
            "delivery_max_in_flight": self.max_in_flight,
        }
        delivery = {k: v for k, v in delivery.items() if v is not None}
        # Only when on: the worker reads them from the signed envelope (worker.tasklogs).
        if self.task_logs is not None:
            delivery["task_logs"] = self.task_logs
        if self.task_output:
            delivery["task_output"] = True
        return delivery


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def task_logs_level(value: Any, where: str = "task") -> str | None:
    """``task_logs`` as the level name the worker captures from, or None (off)."""
    name = task_logs_setting(value, where)
    return None if name in (None, "OFF") else name


def task_logs_setting(value: Any, where: str = "task") -> str | None:
    """``task_logs`` checked and spelt one way: a level name in any case (``"info"``),
    ``true`` (INFO), or ``false`` / ``"off"`` ("OFF": off, also to switch off what an
    environment turned on); None stays unset. Anything else is an error naming the
    setting and the fix: a typo must not silently capture nothing."""
    if value is None:
        return None
    if value is True:
        return "INFO"
    if value is False:
        return "OFF"
    if isinstance(value, str):
        name = value.strip().upper()
        name = "WARNING" if name == "WARN" else name
        if name == "OFF" or name in LOG_LEVELS:
            return name
    raise ValueError(
        f"{where} has invalid task_logs {value!r}; expected a logging level name "
        f"({', '.join(LOG_LEVELS)}), true (INFO) or 'off', e.g. task_logs = \"INFO\""
    )


def _flag(value: Any, key: str, where: str) -> bool:
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ValueError(f"{where} has invalid {key} {value!r}; expected true or false")


def _positive(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if number > 0 else None


def _seconds(value: Any, key: str, where: str) -> float | None:
    """A number of seconds; ``0``, negative or unset means none. Anything that is not a
    number is refused, naming the key and the place: a typo must not switch off a safety
    net silently."""
    if value is None:
        return None
    number = float("nan")
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        with contextlib.suppress(ValueError):
            number = float(value)
    if math.isnan(number):
        raise ValueError(f"{where} has invalid {key} {value!r}; expected a number of seconds")
    return number if number > 0 else None


def resolve_idempotency_key(raw: Any, arguments: Mapping[str, Any], task_id: str) -> str | None:
    """A literal, a ``str.format`` template over the task's named arguments, or a callable
    taking the arguments dict. A template naming a missing argument is an error (silently
    falling back to the literal would merge unrelated runs under one key)."""
    if raw is None:
        return None
    if callable(raw):
        value: Any = raw(dict(arguments))
        return None if value is None else str(value)
    if isinstance(raw, str):
        fields = [name for _, name, _, _ in string.Formatter().parse(raw) if name is not None]
        if not fields:
            return raw
        try:
            return raw.format_map(dict(arguments, task=task_id))
        except (KeyError, IndexError, AttributeError) as exc:
            raise ValueError(
                f"delivery_idempotency_key {raw!r} names {exc} but task '{task_id}' has "
                f"arguments {sorted(arguments)}; fix the template or pass a callable"
            ) from None
    return str(raw)


def check_supported(
    policy: DeliveryPolicy, caps: Capabilities, *, environment: str, executor: str
) -> None:
    """Refuse policies the executor declared it cannot honour."""
    problems: list[str] = []
    if policy.cancel_mode == "require_ack" and not caps.confirm_cancel:
        problems.append(
            "delivery_cancel_mode='require_ack' needs confirmed cancellation, which "
            f"'{executor}' cannot provide; use 'best_effort'"
        )
    if policy.orphan_policy == "requeue" and not caps.requeue:
        problems.append(f"delivery_orphan_policy='requeue' is not supported by '{executor}'")
    if policy.orphan_policy == "detach" and not caps.detach:
        problems.append(
            f"delivery_orphan_policy='detach' needs runs that outlive the caller; "
            f"'{executor}' cannot detach (its work dies with the caller)"
        )
    if problems:
        raise UnsupportedPolicyError(f"Environment '{environment}': " + "; ".join(problems))


KeyFunc = Callable[[Mapping[str, Any]], Any]


V = TypeVar("V")


class FinishedStates(Generic[V]):
    """How the last ``size`` released runs ended, for ``status`` after the backend's
    handle is gone (oldest forgotten first)."""

    def __init__(self, size: int = 10_000) -> None:
        self._states: OrderedDict[str, V] = OrderedDict()
        self._size = size

    def remember(self, handle: str, state: V) -> None:
        self._states[handle] = state
        while len(self._states) > self._size:
            self._states.popitem(last=False)

    def forget(self, handle: str) -> None:
        self._states.pop(handle, None)

    def get(self, handle: str, default: V) -> V:
        return self._states.get(handle, default)
