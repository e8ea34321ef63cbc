"""The wove bridge: our executors inside a real ``wove`` 2.x weave.

``executor(name)`` returns an object a wove environment definition accepts as its
``executor``::

    import wove
    from wove_adapters.integration.wove import executor
    wove.config(environments={"batch": {"executor": executor("process")}})
    with wove.weave() as w:
        @w.do(environment="batch")
        def step(): ...

Or, after ``install()``, plain names in ``wove.config(...)`` and ``wove_config.py``
(``"executor": "celery"``) run on ours (docs/configuration.md, "Plain executor names").

wove starts and stops executors once per weave; ours only borrow the shared, warm
dispatcher (receiver, worker pools, backend clients), so a weave pays a few milliseconds
for it. Frames are forwarded as wove sends them; events come back in wove's dict shape,
``task_error`` carrying the original exception so wove raises it unchanged.

Retries: wove retries a task itself (its ``retries``, every ``Exception``), sending a new
``run_task`` each time, and it reads ``retries`` from its own configuration: the top level
and the environment definitions of ``wove.config(...)`` / ``wove_config.py``. The bridge
adds the retries only our configuration can express, ``retries`` in ``tasks.<name>`` or
``task_defaults`` (tables wove does not have), filtered by ``retry_for`` (a key wove does
not have, read from every level of ours); a retry is a new run ``<run_id>.retry<n>``
(a keyed run's: the same run, attempt + 1, by the dispatcher), and wove sees one run with
one ending. ``retries`` at our top level or in an
environment definition is left to wove, because a shared ``wove_config.py`` gives it to
wove too and both applying it would multiply the attempts (docs/configuration.md,
"retry_for").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import uuid
from collections.abc import Callable
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.chunking import (
    chunk_size,
    chunkable,
    chunks_wanted,
    note_task_seconds,
)
from wove_adapters.core.config import load_config, loading_config
from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.policies import DeliveryPolicy, resolve_idempotency_key
from wove_adapters.core.retry import check_retry_for, retry_allowed
from wove_adapters.core.runtime import Dispatcher
from wove_adapters.core.transport import RunAttempt
from wove_adapters.integration.environments import build_transport, get_dispatcher

_WOVE_DEFAULTS = {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": "cancel"}


def _wove_base() -> type:
    try:
        from wove.environment import EnvironmentExecutor
    except ImportError:
        raise MissingBackendError("wove bridge", "wove", "wove") from None
    return EnvironmentExecutor


class _Bridge:
    """Implementation; ``executor()`` and ``install()`` mix it with wove's abstract base.

    Settings are resolved once, either when built (``executor(...)`` in application code,
    so an unknown name fails there) or at ``start`` (a plain name under ``install()``, or
    ``executor(...)`` written inside ``wove_config.py``, where loading the configuration
    again would run the file again)."""

    def __init__(self, name: str, resolve: _Resolver, *, plain: bool = False) -> None:
        self._name = name
        self._resolve = resolve
        self._plain = plain
        self._settings: dict[str, Any] = {}
        self._tasks: dict[str, dict[str, Any]] = {}
        self._task_defaults: dict[str, Any] = {}
        self._resolved = False
        self._dispatcher: Dispatcher | None = None
        self._events: asyncio.Queue[dict[str, Any]] | None = None
        self._caller_loop: asyncio.AbstractEventLoop | None = None
        # wove's run id -> our run carrying it (its current attempt's run id may differ).
        self._runs: dict[str, _BridgeRun] = {}
        self._retrying: set[asyncio.Task[None]] = set()
        # Runs sent in this loop iteration, by task (see ``_gather``), and each task's
        # moving-average time on the worker (sizes its chunks).
        self._gathered: dict[str, list[tuple[_BridgeRun, Any, asyncio.Future[None]]]] = {}
        self._seconds: dict[str, float] = {}

    def resolve(self, environment: str | None = None) -> None:
        if not self._resolved:
            self._settings, self._tasks, self._task_defaults = self._resolve(environment)
            self._resolved = True
            if self._plain and environment:
                self._name = environment  # runs, ledger rows and errors name wove's environment

    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        self.resolve(environment_name)
        settings = dict(self._settings)
        if environment_config:
            merged = dict(settings.get("executor_config") or {})
            merged.update(environment_config)
            settings["executor_config"] = merged
        self._caller_loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._dispatcher = await shared_loop.run_async(get_dispatcher(self._name, settings))

    def _deliver(self, frame: dict[str, Any]) -> None:
        assert self._caller_loop is not None and self._events is not None
        if frame.get("type") in frames.TERMINAL_EVENTS:
            self._runs.pop(frame.get("run_id", ""), None)
        with contextlib.suppress(RuntimeError):  # the weave's loop already closed
            self._caller_loop.call_soon_threadsafe(self._events.put_nowait, frame)

    def _listener(self, run: _BridgeRun) -> Callable[[dict[str, Any]], None]:
        """Events of ``run``'s attempts, on the shared loop, passed to wove under wove's
        run id; a failure ``retry_for`` allows starts the next attempt instead."""

        def listen(frame: dict[str, Any]) -> None:
            if frame.get("run_id") != run.attempt.run_id:
                return  # an earlier attempt's late event
            if (
                frame.get("type") == frames.TASK_ERROR
                and run.number < run.retries
                and not run.cancelled
                and run.wove_run_id in self._runs
                and retry_allowed(frame, run.retry_for)
            ):
                task = asyncio.ensure_future(self._retry(run))
                self._retrying.add(task)
                task.add_done_callback(self._retrying.discard)
                return
            elapsed = frame.get("elapsed")
            if elapsed is not None:
                note_task_seconds(self._seconds, run.attempt.task_id, float(elapsed))
            self._deliver({**frame, "run_id": run.wove_run_id})

        return listen

    async def _retry(self, run: _BridgeRun) -> None:
        """Submit ``run``'s next attempt (shared loop); if that fails, wove gets the error."""
        run.number += 1
        previous = run.attempt
        # A new run for the dispatcher (its own id, first attempt, nothing submitted yet).
        run.attempt = dataclasses.replace(
            previous, run_id=f"{run.wove_run_id}.retry{run.number}", attempt=1,
            submission=None, extra={},
        )
        dispatcher = self._dispatcher
        try:
            if dispatcher is None:
                raise RuntimeError("the weave stopped its executor before the retry")
            await dispatcher.submit(run.attempt, self._listener(run))
        except Exception as exc:
            self._deliver(frames.error_event(run.wove_run_id, previous.task_id, exc))

    async def _gather(self, run: _BridgeRun, setting: Any) -> None:
        """wove hands its executor one item of a mapped task at a time and does not say
        they belong together; the items of one mapped task reach ``send`` in the same
        loop iteration, though. Runs of one task sent in one iteration are treated as one
        mapped call and cut into chunks (``core.chunking``); a run sent alone stays alone.
        Returns once the run is with the dispatcher (or raises why not)."""
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[None] = loop.create_future()
        if not self._gathered:
            loop.call_soon(self._send_gathered)
        self._gathered.setdefault(run.attempt.task_id, []).append((run, setting, accepted))
        await accepted

    def _send_gathered(self) -> None:
        groups, self._gathered = self._gathered, {}
        for task_id, group in groups.items():
            runs = [run for run, _, _ in group]
            size = chunk_size(group[0][1], len(runs), self._seconds.get(task_id),
                              runs[0].attempt.policy.max_in_flight)
            call = uuid.uuid4().hex
            for index, run in enumerate(runs):
                if size > 1:
                    number = index // size
                    run.attempt.extra["chunk"] = (
                        call, number, min(size, len(runs) - number * size)
                    )
            submitting = shared_loop.submit(self._submit_all(runs))
            submitting.add_done_callback(functools.partial(
                self._accepted, [accepted for _, _, accepted in group]
            ))

    async def _submit_all(self, runs: list[_BridgeRun]) -> list[BaseException | None]:
        """Each run to the dispatcher (shared loop): one hop for the whole group."""
        errors: list[BaseException | None] = []
        for run in runs:
            try:
                assert self._dispatcher is not None, "executor is not started"
                await self._dispatcher.submit(run.attempt, self._listener(run))
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _accepted(
        self, waiters: list[asyncio.Future[None]],
        done: concurrent.futures.Future[list[BaseException | None]],
    ) -> None:
        """Settle each ``send`` (on the weave's loop) with its run's submission."""
        assert self._caller_loop is not None

        def settle() -> None:
            errors: list[BaseException | None]
            try:
                errors = done.result()
            except BaseException as exc:
                errors = [exc] * len(waiters)
            for waiter, error in zip(waiters, errors, strict=True):
                if waiter.done():
                    continue
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the weave's loop already closed
            self._caller_loop.call_soon_threadsafe(settle)

    async def send(self, frame: dict[str, Any]) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise RuntimeError("executor is not started")
        kind = frame.get("type")
        if kind == frames.RUN_TASK:
            task_id = str(frame.get("task_id", ""))
            # The tasks.<name> table of our configuration (wove's task name), over the
            # environment's settings.
            configured = {**self._settings, **self._tasks.get(task_id, {})}
            delivery = {k: v for k, v in (frame.get("delivery") or {}).items() if v is not None}
            # wove always sends its resolved defaults; where it only has its default and
            # our environment or task table sets the policy, ours wins.
            for name, wove_default in _WOVE_DEFAULTS.items():
                if delivery.get(name) == wove_default and configured.get(name):
                    delivery.pop(name)
            settings = {**configured, **delivery}
            policy = DeliveryPolicy.from_settings(settings, where=f"Environment '{self._name}'")
            args = dict(frame.get("args") or {})
            key = delivery.get("delivery_idempotency_key")
            if key is None:
                key = resolve_idempotency_key(policy.idempotency_key, args, task_id)
            attempt = RunAttempt(
                run_id=frame["run_id"],
                task_id=task_id,
                func=frame["callable"],
                args=args,
                policy=policy,
                idempotency_key=None if key is None else str(key),
                environment=self._name,
            )
            retries = self._our_retries(task_id)
            retry_for = check_retry_for(configured.get("retry_for"))
            if attempt.idempotency_key is not None and retries > 0:
                # A keyed run is retried in place by the dispatcher: one run in the
                # ledger, attempt + 1; the bridge adds none of its own.
                attempt.extra["in_place_retries"] = (retries, retry_for)
                retries = 0
            run = _BridgeRun(
                wove_run_id=attempt.run_id, attempt=attempt, retries=retries,
                retry_for=retry_for,
            )
            self._runs[run.wove_run_id] = run
            setting = settings.get("map_chunk_size", "auto")
            keyed = attempt.idempotency_key is not None
            if chunkable(policy, dispatcher.transport, keyed=keyed) and chunks_wanted(setting):
                await self._gather(run, setting)
            else:
                await shared_loop.run_async(dispatcher.submit(attempt, self._listener(run)))
        elif kind == frames.CANCEL_TASK:
            run_id = frame.get("run_id", "")
            mode = frame.get("delivery_cancel_mode")
            # As for run_task: wove's own default gives way to our environment's setting.
            default = _WOVE_DEFAULTS["delivery_cancel_mode"]
            if mode == default and self._settings.get("delivery_cancel_mode"):
                mode = None  # the run's own policy (this environment's) decides
            found = self._runs.get(run_id)
            if found is not None:
                found.cancelled = True  # no further attempt
                run_id = found.attempt.run_id
            shared_loop.submit(_quiet(dispatcher.cancel(run_id, mode)))
        elif kind == frames.SHUTDOWN:
            await self._abandon()
        else:
            raise ValueError(f"Unsupported frame type: {kind}")

    async def recv(self) -> dict[str, Any]:
        assert self._events is not None
        return await self._events.get()

    async def stop(self) -> None:
        await self._abandon()
        self._dispatcher = None

    def _our_retries(self, task_id: str) -> int:
        """``retries`` from the task-level tables only wove lacks: ``tasks.<name>``, then
        ``task_defaults`` (see the module docstring for why not the other levels)."""
        for table in (self._tasks.get(task_id, {}), self._task_defaults):
            if table.get("retries") is not None:
                return int(table["retries"])
        return 0

    async def _abandon(self) -> None:
        if self._dispatcher is not None and self._runs:
            runs, self._runs = list(self._runs.values()), {}
            for run in runs:
                run.cancelled = True
            await shared_loop.run_async(
                self._dispatcher.abandon(
                    [run.attempt.run_id for run in runs],
                    reason="the weave stopped with the run in flight",
                )
            )


@dataclasses.dataclass
class _BridgeRun:
    """One ``run_task`` of wove's, across the attempts the bridge's own retries add."""

    wove_run_id: str
    attempt: RunAttempt
    retries: int
    retry_for: frozenset[str] | None
    number: int = 0
    cancelled: bool = False


async def _quiet(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


# (environment settings, our tasks table, our task_defaults table)
_Resolved = tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any]]
_Resolver = Callable[[str | None], _Resolved]


def _settings_for(
    name: str,
    environment: str | None,
    *,
    plain: bool,
    config: dict[str, Any] | None = None,
) -> _Resolved:
    """(settings, tasks table, task_defaults) for ``name``: one of our configured
    environments, or an executor name. ``plain``: wove's environment ``environment`` names
    executor ``name``; our definition of that environment (same file) gives its settings,
    if it has one."""
    cfg = load_config(config)
    definition = cfg.environments.get(environment or "")
    if plain and definition is not None and definition.get("executor") == name:
        return cfg.environment_settings(str(environment)), cfg.tasks, cfg.task_defaults
    if not plain and name in cfg.environments:
        return cfg.environment_settings(name), cfg.tasks, cfg.task_defaults
    _require_executor_name(name, sorted(cfg.environments))
    resolved = cfg.environment_settings(cfg.default_environment)
    resolved["executor"] = name
    resolved["executor_config"] = {}
    return resolved, cfg.tasks, cfg.task_defaults


def executor(
    name: str = "process",
    *,
    config: dict[str, Any] | None = None,
    executor_config: dict[str, Any] | None = None,
    **settings: Any,
) -> Any:
    """A wove ``EnvironmentExecutor`` running tasks through one of our executors.

    ``name`` is one of our configured environments (settings come from our layered
    configuration) or an executor name (``process``, ``stdio``, ``celery``, ...). Written
    inside ``wove_config.py`` it resolves when the weave starts it."""

    def resolve(_environment: str | None) -> _Resolved:
        resolved, tasks, task_defaults = _settings_for(name, None, plain=False, config=config)
        if executor_config:
            resolved["executor_config"] = {
                **(resolved.get("executor_config") or {}), **executor_config
            }
        resolved.update(settings)
        if not resolved.get("force_local"):  # else the environment runs locally (no library)
            build_transport(resolved["executor"])  # unknown names and missing extras fail here
        return resolved, tasks, task_defaults

    bridge = _bridge_class()(name, resolve)
    if not loading_config():
        bridge.resolve()
    return bridge


def _bridge_class() -> type[_Bridge]:
    global _BRIDGE
    if _BRIDGE is None:
        _BRIDGE = type("WoveAdaptersExecutor", (_Bridge, _wove_base()), {})
    return _BRIDGE


_BRIDGE: type[_Bridge] | None = None


# ------------------------------------------------------------------ install()

# The wove releases this seam was written and tested against; another 2.x is checked for
# the seam itself, a 3.x refused.
WOVE_TESTED = "2.0.3"
# Names wove keeps even after install(): its in-process default, which ours would only
# make slower.
WOVE_KEEPS = frozenset({"local"})
_original_coerce: Callable[[Any], Any] | None = None


def install() -> None:
    """Let plain executor names in ``wove.config(...)`` and wove's ``wove_config.py``
    (``"executor": "celery"``) run on our executors inside real wove weaves, with that
    environment's settings from our configuration (``environments.<name>``,
    ``executor_config``, ``tasks.<name>``). Idempotent; ``uninstall()`` undoes it.

    wove has no plugin hook, so this replaces one function, ``wove.environment.
    coerce_executor``, through which wove 2.x builds every environment's executor; names
    that are not ours (and ``local``) still go to wove's own. It checks that wove still
    builds executors that way and refuses, naming the fix, if a wove release changed it."""
    global _original_coerce
    environment_mod = _wove_environment()
    if _original_coerce is not None:
        return
    original = environment_mod.coerce_executor

    def coerce_executor(value: Any) -> Any:
        if isinstance(value, str) and value not in WOVE_KEEPS and value in _our_names():
            return _bridge_class()(value, _plain_resolver(value), plain=True)
        return original(value)

    coerce_executor.__wrapped__ = original  # type: ignore[attr-defined]
    environment_mod.coerce_executor = coerce_executor
    _original_coerce = original


def uninstall() -> None:
    """Give wove back its own executor lookup."""
    global _original_coerce
    if _original_coerce is not None:
        _wove_environment().coerce_executor = _original_coerce
        _original_coerce = None


def installed() -> bool:
    return _original_coerce is not None


def _plain_resolver(name: str) -> _Resolver:
    def resolve(environment: str | None) -> _Resolved:
        return _settings_for(name, environment, plain=True)

    return resolve


def _our_names() -> set[str]:
    from wove_adapters.adapters.registry import executor_names

    return set(executor_names())


def _wove_environment() -> Any:
    _wove_base()  # a missing wove names the extra
    import importlib.metadata

    import wove.environment as environment_mod

    version = importlib.metadata.version("wove")
    major = version.split(".", 1)[0]
    ensure = getattr(getattr(environment_mod, "ExecutorRuntime", None), "ensure_environment", None)
    seam = callable(getattr(environment_mod, "coerce_executor", None)) and (
        "coerce_executor" in getattr(getattr(ensure, "__code__", None), "co_names", ())
    )
    if major != "2" or not seam:
        raise RuntimeError(
            f"wove_adapters.integration.wove.install() does not support wove {version}: it "
            f"plugs into wove.environment.coerce_executor, which wove 2.x (tested with "
            f"{WOVE_TESTED}) uses to build executors, and this wove "
            f"{'is not 2.x' if major != '2' else 'no longer does'}. Pin wove=={WOVE_TESTED}, "
            f"or pass executor objects instead of names: "
            f'{{"executor": wove_adapters.integration.wove.executor("celery")}}.'
        )
    return environment_mod


def _require_executor_name(name: str, environments: list[str]) -> None:
    """``name`` is not a configured environment: it must be an executor name. Say both
    lists when it is neither, because the caller may have meant either (a typo in an
    environment name would otherwise read as an unknown *executor*)."""
    from wove_adapters.adapters.registry import executor_names

    executors = executor_names()
    if name in executors:
        return
    import difflib

    configured = ", ".join(environments) if environments else "none"
    close = difflib.get_close_matches(name, [*environments, *executors], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown executor {name!r}: {name!r} is neither a configured environment nor an "
        f"executor name.{hint} Configured environments: {configured}. Executor names: "
        f"{', '.join(executors)}. Add an environment named {name!r} to your configuration "
        f"(wove_config.py or TOML, `[environments.{name}]`) or pass one of those names."
    )
