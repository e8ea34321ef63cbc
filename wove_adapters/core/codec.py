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

A result or exception too large for the way back travels by reference (``result_ref``,
``exception_ref``, see ``core.frames``): ``wire_to_frame`` takes its bytes from the store
the reference names and checks their sha256 before unpickling, so it blocks (the caller
runs it in a thread); a reference that is missing or does not match is a
``StoredResultError`` and nothing is unpickled.

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
from wove_adapters.core.errors import PayloadError, TaskExecutionError, redact_url
from wove_adapters.core.stores import BodyRef, DigestMismatch, open_store

__all__ = [
    "BY_REFERENCE",
    "RemoteTraceback",
    "StoredResultError",
    "attach_remote_traceback",
    "decode_outcome",
    "exception_from_frame",
    "frame_to_wire",
    "pickled_exception",
    "rebuild_exception",
    "sign_events",
    "stored_refs",
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


# ---------------------------------------------------------------- results by reference


class StoredResultError(PayloadError):
    """A result (or exception) sent by reference could not be taken: it is missing from
    its store, or its bytes are not the ones the worker signed. Nothing was unpickled."""


class _ByReference:
    """Pickles to ``getattr("", <message>)``: what ``TaskResult.result`` holds when the
    result travels by reference. A reader that predates ``result_ref`` unpickles it and
    fails with the message (no wrong value, nothing of ours imported), instead of a bare
    "Ran out of input"."""

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return getattr, ("", "wove-adapters: this result was sent by reference (result_ref); "
                             "upgrade wove-adapters where it is read")


BY_REFERENCE = pickle.dumps(_ByReference(), protocol=2)


def stored_refs(event: frames.WireEvent) -> list[BodyRef]:
    """What a verified event left in a store for its caller (empty for most events)."""
    ref = (
        event.result_ref if isinstance(event, frames.TaskResult)
        else event.exception_ref if isinstance(event, frames.TaskError)
        else None
    )
    return [] if ref is None else [ref]


def fetch_stored(event: frames.TaskResult | frames.TaskError, ref: BodyRef) -> bytes:
    """The bytes ``ref`` names, checked against its sha256 (blocking: a thread)."""
    what = "result" if isinstance(event, frames.TaskResult) else "pickled exception"
    failed = ""
    if isinstance(event, frames.TaskError):
        failed = f" (the task failed with {event.error.kind}: {event.error.message})"
    where = f"{redact_url(ref.store)}, key {ref.key}, {ref.size} bytes"
    try:
        return open_store(ref.store).get(ref, what=what)
    except DigestMismatch:
        raise StoredResultError(
            f"the {what} of run {event.run_id}{failed} was sent by reference ({where}) "
            f"and the stored bytes do not match the sha256 its worker signed: refused, "
            f"nothing was unpickled. Someone who can write to that store changed them."
        ) from None
    except Exception as exc:
        raise StoredResultError(
            f"the {what} of run {event.run_id}{failed} was sent by reference ({where}) and "
            f"cannot be read: {type(exc).__name__}: {exc}. The caller takes a stored result "
            f"once and deletes it; those of runs with an idempotency key or "
            f"delivery_orphan_policy 'detach' are kept until the store expires them "
            f"(docs/security.md, 'Limits'). The caller must be able to read the store its "
            f"workers write to (executor_config.payload_store)."
        ) from None


# ---------------------------------------------------------------- wire <-> frame


def wire_to_frame(event: frames.WireEvent, raw: bytes | None = None) -> dict[str, Any]:
    """A verified wire event as a wove dict frame; results and exceptions unpickled (those
    sent by reference taken from their store and checked first: this may block)."""
    kind = type(event).__struct_config__.tag
    frame = frames.event(str(kind), event.run_id, event.task_id, event.attempt)
    if isinstance(event, frames.TaskResult):
        data = event.result if event.result_ref is None else fetch_stored(event, event.result_ref)
        frame["result"] = loads(data)
        if event.elapsed is not None:
            frame["elapsed"] = event.elapsed
    elif isinstance(event, frames.TaskError):
        payload = event.error.to_dict()
        frame["error"] = payload
        pickled = event.exception
        if event.exception_ref is not None:
            pickled = fetch_stored(event, event.exception_ref)
        # The original type with the worker's traceback chained (TaskExecutionError when
        # it does not unpickle here).
        frame["exception"] = rebuild_exception(payload, pickled)
        if event.elapsed is not None:
            frame["elapsed"] = event.elapsed
    elif isinstance(event, frames.Log):
        frame["message"] = event.message
        frame["level"] = event.level
        if event.pid:  # a worker's record (core.tasklogs emits it in the caller)
            frame.update(levelno=event.levelno, logger=event.logger, time=event.time,
                         host=event.host, pid=event.pid, exc_text=event.exc_text,
                         dropped=event.dropped)
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
    taken: list[BodyRef] | None = None,
    **binding: Any,
) -> dict[str, Any]:
    """Verify a stored outcome and return its terminal event as a frame. Blocking (it may
    read a key file or a result sent by reference, and it unpickles): call it in a thread.
    A result by reference is read, never deleted (other readers may follow); ``taken``,
    if given, receives its reference once it is verified, for the run's owner to delete.

    What it is checked against, before anything is unpickled: ``key_id``, the key the
    outcome must be signed with (``signing.accepts``: the reader's own key, or, for a
    reader with a generated key, another generated key of this user); ``run_id``, the
    run it must belong to; ``idempotency_key`` and ``task_id``, the key and task it must
    answer for (an outcome read by key from a ledger or a backend). A mismatch is a
    ``PayloadError`` naming both sides. (``binding``: ``verified_outcome``'s keywords.)"""
    event = verified_outcome(blob_bytes, run_id, **binding)
    if taken is not None:
        taken.extend(stored_refs(event))
    return wire_to_frame(event)


def verified_outcome(
    blob_bytes: bytes,
    run_id: str | None = None,
    *,
    key_id: str | None = None,
    idempotency_key: str | None = _ANY,
    task_id: str | None = None,
) -> frames.TaskResult | frames.TaskError | frames.TaskCancelled:
    """The terminal event of a stored outcome, its signature and binding checked as
    ``decode_outcome`` checks them, with nothing unpickled: for a reader that shows the
    error payload and never needs the value (the runs page). Blocking: a key file may
    be read."""
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
    return event
