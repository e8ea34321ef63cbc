"""Wire events <-> wove frames, stored outcomes, and remote exceptions rebuilt.

Everything that turns what a worker sent (a verified ``WireEvent``, a signed outcome
read back from a ledger or a drop box) into the dict frame the caller sees, and back,
lives here, in ``core``: the dispatcher, the transports, the adapters and the CLI all
decode the same way without importing the dispatcher or the worker side.

A pickled exception loses its traceback: unpickled in the caller, it would show only the
caller's frames (the Hub, the dispatcher) and none of the task's. This module gives it
back the way ``concurrent.futures.process`` does: the original exception type, with
``__cause__`` set to a ``RemoteTraceback`` whose ``str`` is the worker's formatted
traceback, so ``traceback.print_exc()`` in the caller prints the worker's frames first
("The above exception was the direct cause of the following exception"). An exception
that cannot be unpickled here (its class exists only on the worker) becomes a
``TaskExecutionError`` with the remote kind, message and traceback, chained the same way.

No backend library is imported: ``core`` stays free of them.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Mapping
from typing import Any

import msgspec

from wove_adapters.core import frames, signing
from wove_adapters.core.envelope import dumps, loads
from wove_adapters.core.errors import PayloadError, TaskExecutionError

__all__ = [
    "RemoteTraceback",
    "attach_remote_traceback",
    "decode_outcome",
    "exception_from_frame",
    "frame_to_wire",
    "pickled_exception",
    "rebuild_exception",
    "sign_events",
    "wire_to_frame",
]

_encoder = msgspec.msgpack.Encoder()


class RemoteTraceback(Exception):
    """The worker's formatted traceback, chained as ``__cause__`` of a rebuilt exception.

    Its ``str`` is the traceback text itself, so the caller's printed traceback shows the
    task's frames (file, line, function) as the worker saw them."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def attach_remote_traceback(exc: BaseException, remote_traceback: str) -> BaseException:
    """Chain ``remote_traceback`` to ``exc`` as its cause; returns ``exc``.

    Idempotent (a second call keeps the first chain), and a no-op for an empty text, so
    every path that rebuilds an exception may call it without coordinating with others.
    The remote text already contains the remote exception's own causes and contexts.
    """
    if not remote_traceback or isinstance(exc.__cause__, RemoteTraceback):
        return exc
    exc.__cause__ = RemoteTraceback(f'\n"""\n{remote_traceback.rstrip()}\n"""')
    return exc


def rebuild_exception(error: Mapping[str, Any], pickled: bytes | None) -> BaseException:
    """The caller-side exception for a ``task_error`` event.

    ``error`` is the normalized payload (``kind``, ``message``, ``traceback``, ...);
    ``pickled`` the cloudpickled original exception, if the worker could pickle it. The
    original type comes back when it unpickles here, else ``TaskExecutionError``; either
    way with the worker's traceback chained (see the module docstring). Drop-in for the
    block in ``wire_to_frame`` that builds ``frame["exception"]``.
    """
    payload = dict(error)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            loaded = pickle.loads(pickled)  # cloudpickle's loads is pickle's
        except Exception:
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = TaskExecutionError(payload)
    return attach_remote_traceback(exc, str(payload.get("traceback") or ""))


def pickled_exception(exc: BaseException) -> bytes | None:
    """The exception pickled for the caller, if it round-trips here; None otherwise (the
    caller then rebuilds it from its type name and message). Its pickling runs user code
    (a ``__reduce__`` may even call ``sys.exit``), which must not end the worker."""
    try:
        data = dumps(exc)
        loads(data)
        return data
    except BaseException:
        return None


# ---------------------------------------------------------------- wire <-> frame


def wire_to_frame(event: frames.WireEvent, raw: bytes | None = None) -> dict[str, Any]:
    """A verified wire event as a wove dict frame; results and exceptions unpickled."""
    kind = type(event).__struct_config__.tag
    frame = frames.event(str(kind), event.run_id, event.task_id, event.attempt)
    if isinstance(event, frames.TaskResult):
        frame["result"] = loads(event.result)
    elif isinstance(event, frames.TaskError):
        payload = event.error.to_dict()
        frame["error"] = payload
        # The original type with the worker's traceback chained (TaskExecutionError when
        # it does not unpickle here).
        frame["exception"] = rebuild_exception(payload, event.exception)
    elif isinstance(event, frames.Log):
        frame["message"] = event.message
        frame["level"] = event.level
    elif isinstance(event, (frames.TaskCancelled, frames.TaskLost)):
        frame["reason"] = event.reason
    if raw is not None:
        frame["_blob"] = raw
    return frame


def frame_to_wire(
    frame: dict[str, Any], *, idempotency_key: str | None = None
) -> frames.WireEvent:
    """The inverse, for recording a locally produced outcome in a shared ledger (bound to
    the run's ``idempotency_key``, see ``frames.TaskResult``)."""
    ident = {
        "run_id": frame["run_id"],
        "task_id": frame.get("task_id", ""),
        "attempt": frame.get("attempt", 1),
        "idempotency_key": idempotency_key,
    }
    kind = frame["type"]
    if kind == frames.TASK_RESULT:
        return frames.TaskResult(**ident, result=dumps(frame.get("result")))
    if kind == frames.TASK_ERROR:
        exc = frame.get("exception")
        error = frame.get("error") or {"kind": "Error", "message": str(exc)}
        return frames.TaskError(
            **ident,
            error=msgspec.convert(error, frames.ErrorPayload),
            exception=pickled_exception(exc) if isinstance(exc, BaseException) else None,
        )
    return frames.TaskCancelled(**ident, reason=str(frame.get("reason", "")))


def exception_from_frame(frame: dict[str, Any]) -> BaseException:
    exc = frame.get("exception")
    if isinstance(exc, BaseException):
        return exc
    return TaskExecutionError(frame.get("error") or {"kind": "Error", "message": "task failed"})


# ---------------------------------------------------------------- signed batches


def sign_events(events: list[frames.WireEvent], key_id: str) -> signing.SignedBlob:
    """Events as one signed ``EventBatch``: the form every way back carries (HTTP, the
    Redis drop box) and every ledger stores."""
    return signing.sign(
        _encoder.encode(frames.EventBatch(events=events, sent_at=time.time())), key_id
    )


_ANY: Any = object()


def decode_outcome(
    blob_bytes: bytes,
    run_id: str | None = None,
    *,
    key_id: str | None = None,
    idempotency_key: str | None = _ANY,
    task_id: str | None = None,
) -> dict[str, Any]:
    """Verify a stored outcome and return its terminal event as a frame. Blocking (it may
    read a key file, and it unpickles): call it in a thread.

    What it is checked against, before anything is unpickled: ``key_id``, the key the
    outcome must be signed with (``signing.accepts``: the reader's own key, or, for a
    reader with a generated key, another generated key of this user); ``run_id``, the
    run it must belong to; ``idempotency_key`` and ``task_id``, the key and task it must
    answer for (an outcome read by key from a ledger or a backend). A mismatch is a
    ``PayloadError`` naming both sides."""
    blob = signing.decode_blob(blob_bytes)
    if key_id is not None and not signing.accepts(key_id, blob.key_id):
        raise PayloadError(
            f"the stored outcome is signed with key {blob.key_id!r}, which this environment "
            f"(key {key_id}) does not trust; give every caller that shares an idempotency "
            f"key the same secret"
        )
    body = signing.verify(blob, window=None)
    batch = msgspec.msgpack.decode(body, type=frames.EventBatch)
    for event in reversed(batch.events):
        if isinstance(event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled)):
            if run_id is None or event.run_id == run_id:
                break
    else:
        raise ValueError("the stored outcome holds no terminal event")
    if idempotency_key is not _ANY and event.idempotency_key != idempotency_key:
        raise PayloadError(
            f"the stored outcome of run {event.run_id} answers for idempotency key "
            f"{event.idempotency_key!r}, not {idempotency_key!r}: refused (a record points "
            f"at another run's outcome)"
        )
    if task_id is not None and event.task_id != task_id:
        raise PayloadError(
            f"the stored outcome of run {event.run_id} is of task {event.task_id!r}, not "
            f"{task_id!r}: refused"
        )
    return wire_to_frame(event)
