"""Command and event frames: the wove 2.x contract as dicts, and typed structs on the wire.

In process, frames are plain dicts exactly as wove 2.x passes them to an executor
(``{"type": "run_task", "run_id": ..., "callable": fn, "args": {...}, "delivery": {...}}``),
so our executors drop into a wove weave unchanged. Whenever a frame crosses a process
boundary it becomes one of the frozen msgspec structs below: the decoder rejects a
malformed frame with a clean error, and a field added later with a default keeps old
workers readable. Python values (callables, arguments, results, exceptions) travel as
cloudpickle bytes inside those structs and are unpickled only after verification.
"""

from __future__ import annotations

import traceback
from typing import Any, Final, Literal, Protocol, Union

import msgspec

from wove_adapters.core.stores import BodyRef

RUN_TASK: Final = "run_task"
CANCEL_TASK: Final = "cancel_task"
SHUTDOWN: Final = "shutdown"
TASK_STARTED: Final = "task_started"
HEARTBEAT: Final = "heartbeat"
LOG: Final = "log"
TASK_RESULT: Final = "task_result"
TASK_ERROR: Final = "task_error"
TASK_CANCELLED: Final = "task_cancelled"
# Internal to this package: a transport tells the dispatcher that a run is gone without a
# terminal event. The dispatcher turns it into the orphan policy; wove never sees it.
TASK_LOST: Final = "task_lost"

TERMINAL_EVENTS: Final = frozenset({TASK_RESULT, TASK_ERROR, TASK_CANCELLED})
EVENT_TYPES: Final = frozenset(
    {TASK_STARTED, HEARTBEAT, LOG, TASK_RESULT, TASK_ERROR, TASK_CANCELLED, TASK_LOST}
)

CancelMode = Literal["best_effort", "require_ack"]
OrphanPolicy = Literal["fail", "cancel", "requeue", "detach"]
CANCEL_MODES: Final = ("best_effort", "require_ack")
ORPHAN_POLICIES: Final = ("cancel", "detach", "fail", "requeue")


class ErrorPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A task failure normalized so any caller can read it without the original class."""

    kind: str
    message: str
    traceback: str = ""
    retryable: bool = False
    source: str = "task"  # task | worker | transport | backend | orphan | payload

    def to_dict(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


def normalize_exception(
    exc: BaseException, *, source: str = "task", retryable: bool = False
) -> ErrorPayload:
    return ErrorPayload(
        kind=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        retryable=retryable,
        source=source,
    )


# ---------------------------------------------------------------- wire events


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    run_id: str
    task_id: str = ""
    attempt: int = 1


class TaskStarted(_Event, frozen=True, kw_only=True, tag=TASK_STARTED):
    pid: int | None = None
    host: str | None = None


class Heartbeat(_Event, frozen=True, kw_only=True, tag=HEARTBEAT):
    pass


class Log(_Event, frozen=True, kw_only=True, tag=LOG):
    """A record of the task's ``logging`` (or a line of its stdout/stderr) sent home by
    its worker (``worker.tasklogs``); the caller emits it under ``wove_adapters.task``
    (``core.tasklogs``). The fields after ``level`` are the worker's, added with defaults
    so older frames still decode."""

    message: str
    level: str = "info"
    levelno: int = 20
    logger: str = ""  # the worker's logger name; "stdout" / "stderr" for output lines
    time: float = 0.0  # the record's ``created`` on the worker (epoch seconds)
    host: str = ""
    pid: int = 0
    exc_text: str = ""
    # The worker's rate limit dropped this many of the run's records (the one summary
    # frame the worker sends at the end; 0 for ordinary records).
    dropped: int = 0


# Terminal events name the idempotency key of their run (None: none), inside the
# signature: a stored outcome then answers only for its own key and task, so whoever can
# write a ledger or a result backend cannot point key K at another run's genuine outcome.
#
# A result or pickled exception above the worker's limit (worker.runner.RESULT_INLINE_LIMIT)
# waits in the store the payload named and travels as a reference with its sha256
# (``result_ref`` / ``exception_ref``), checked before anything is unpickled; ``result``
# then holds codec.BY_REFERENCE, which a reader too old to know the field fails on with
# a message that says so (see core.codec).
class TaskResult(_Event, frozen=True, kw_only=True, tag=TASK_RESULT):
    result: bytes  # cloudpickle
    idempotency_key: str | None = None
    result_ref: BodyRef | None = None
    # Seconds the task body ran on the worker: what sizes a mapped call's chunks.
    elapsed: float | None = None


class TaskError(_Event, frozen=True, kw_only=True, tag=TASK_ERROR):
    error: ErrorPayload
    exception: bytes | None = None  # cloudpickle of the original exception, best effort
    idempotency_key: str | None = None
    exception_ref: BodyRef | None = None
    # Seconds the task body ran before it raised (as TaskResult.elapsed): what the run
    # time metric of a failed run is (wove_adapters.observability.metrics).
    elapsed: float | None = None


class TaskCancelled(_Event, frozen=True, kw_only=True, tag=TASK_CANCELLED):
    reason: str = ""
    idempotency_key: str | None = None


class TaskLost(_Event, frozen=True, kw_only=True, tag=TASK_LOST):
    reason: str = ""


WireEvent = Union[TaskStarted, Heartbeat, Log, TaskResult, TaskError, TaskCancelled, TaskLost]


class EventBatch(msgspec.Struct, frozen=True, kw_only=True):
    """What one callback POST carries: every event the worker had queued, in order."""

    events: list[WireEvent]
    sent_at: float = 0.0


# ---------------------------------------------------------------- wire commands (stdio)


class RunTaskWire(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=RUN_TASK):
    run_id: str
    task_id: str
    body: bytes  # cloudpickle of (callable, args)
    attempt: int = 1
    heartbeat_seconds: float | None = None
    # What the worker sends home besides events (docs/observability.md, "Logs"): the
    # level of ``logging`` records to capture (None: none) and the task's stdout/stderr.
    task_logs: str | None = None
    task_output: bool = False
    # The caller's W3C trace context for this attempt (see core.envelope.Envelope.trace).
    trace: dict[str, str] | None = None


class CancelTaskWire(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=CANCEL_TASK):
    run_id: str
    task_id: str = ""


class ShutdownWire(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=SHUTDOWN):
    pass


WireCommand = Union[RunTaskWire, CancelTaskWire, ShutdownWire]


# ---------------------------------------------------------------- dict frames


def event(kind: str, run_id: str, task_id: str = "", attempt: int = 1, **fields: Any) -> dict:
    """Build an in-process event frame in wove's dict shape."""
    frame = {"type": kind, "run_id": run_id, "task_id": task_id, "attempt": attempt}
    frame.update(fields)
    return frame


class _Names(Protocol):
    @property
    def run_id(self) -> str: ...
    @property
    def task_id(self) -> str: ...
    @property
    def attempt(self) -> int: ...


def event_of(source: _Names, kind: str, **fields: Any) -> dict:
    """``event`` for the run ``source`` names: an attempt, or an event it answered."""
    return event(kind, source.run_id, source.task_id, source.attempt, **fields)


def error_event(
    run_id: str,
    task_id: str,
    exc: BaseException,
    *,
    attempt: int = 1,
    source: str = "task",
    retryable: bool = False,
) -> dict:
    """A ``task_error`` frame that carries the live exception, as wove's runtime expects."""
    payload = normalize_exception(exc, source=source, retryable=retryable)
    return event(TASK_ERROR, run_id, task_id, attempt, error=payload.to_dict(), exception=exc)
