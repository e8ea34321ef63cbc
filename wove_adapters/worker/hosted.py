"""Payloads run by a function of ours that another system's worker calls (Dask, Ray).

Such a backend ships the payload text as the argument of one module-level function,
imported by reference on its worker, and carries what that function returns (or raises)
back to the caller in its own future: ``run_dask`` and ``run_ray``, which differ only in
their signal handling. What they share: the payload verified or refused (``verified``),
the run that reports to the caller (``run_reported``), the run whose value travels in the
future (``run_native``), and the probe ``doctor`` sends to every worker. Nothing here
talks to Dask or Ray, and importing this module imports neither.
"""

from __future__ import annotations

import functools
import os
import signal
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wove_adapters.core import frames
from wove_adapters.core.envelope import is_chunk

if TYPE_CHECKING:
    from wove_adapters.core.envelope import Envelope


class PayloadRefused(RuntimeError):
    """Raised on the worker for a payload that does not verify: the backend's future fails
    with it, which is the only report of the refusal. Nothing in such a payload can be
    trusted, so nothing is signed for it and nothing is sent to the address it names; the
    caller's adapter turns this failure into the run's PayloadError naming its key id.

    An exception rather than a returned value: Dask fetches a finished future's value only
    on the native path, while every future's failure reaches the caller at no extra cost,
    and a value could be mistaken for a native task's own result."""


def verified(payload: str) -> Envelope:
    """The payload's envelope, verified before anything in it is unpickled; a payload
    that does not verify is refused (logged on the worker, see ``worker.runner``) and
    raises ``PayloadRefused``."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError
    from wove_adapters.worker import runner as worker

    try:
        return payload_mod.decode_payload(payload)
    except PayloadError as exc:
        worker._refuse(exc)  # the worker's log says why; nothing is signed or sent
        raise PayloadRefused(f"the worker refused the payload: {exc}") from None


def run_chunk(payload: str, *, handle_sigterm: bool = True) -> str:
    """A chunk (``worker.chunks``): its runs report for themselves; returns ``"chunk"``
    for the future to carry. Raises like ``verified`` when no piece verified, and like
    ``run_reported`` when an outcome reached neither the caller nor the ledger."""
    from wove_adapters.core.policies import RunState
    from wove_adapters.worker import chunks

    done = chunks.run_chunk(payload, handle_sigterm=handle_sigterm)
    if done.state is RunState.REFUSED:
        raise PayloadRefused("the worker refused every payload of the chunk")
    if not done.delivered:
        raise OutcomeUndelivered(f"outcomes of a chunk were not delivered: {done.summary()}")
    return "chunk"


class OutcomeUndelivered(RuntimeError):
    """Raised on the worker when the terminal event reached neither the caller nor the
    ledger: the backend's future then reports the run as lost instead of finished."""


def run_reported(envelope: Envelope, *, handle_sigterm: bool = True) -> str:
    """Run with ``worker.runner`` (started, heartbeats and the terminal event go to the
    caller) and return the outcome's state for the future to carry.

    Returns as soon as the caller has the outcome or this process's outbox owns it (the
    caller is gone or slow): the backend's worker slot is free for the next task at once.
    """
    from wove_adapters.worker import runner as worker

    outcome = worker.run_envelope(envelope, handle_sigterm=handle_sigterm)
    if not outcome.delivered:
        raise OutcomeUndelivered(
            f"run {envelope.run_id}: the worker could not deliver its outcome to "
            f"{envelope.return_path.url or envelope.return_path.kind}"
        )
    return outcome.state


# The signed batch of a short run travels in the future up to this size; larger (a result
# near the inline limit) it goes by the http path, whose receiver verifies large bodies
# off the caller's event loop.
RETURNED_LIMIT = 256 * 1024


def run_returned(envelope: Envelope, *, handle_sigterm: bool = True) -> Any:
    """Run a payload whose caller takes a short run's outcome from the backend's future
    (the caller asked for it: Ray's and Dask's adapters on the ``http`` return path).

    A task that ends within the short-task window (``runner.STARTED_AFTER``) sent no
    event yet; its terminal event (its log frames ahead of it), signed exactly as a POST
    to the caller's receiver would be, becomes the future's value as ``bytes``: no HTTP
    request, no wait for an acknowledgement, nothing left in the outbox. The caller
    checks those bytes as its receiver checks a request before anything in them is
    unpickled (``callbacks.inbox.Inbox.accept_signed``). Plain bytes, not an object: the
    backend carries them without pickling, and no value of this path is anything else
    (``run_reported`` returns the state as a ``str``).

    A run that outlived the window (the caller has its ``task_started``), a ``detach``
    run (its outcome belongs in the ledger, whoever waits) or a large outcome is
    delivered as ``run_reported`` delivers it, and the future carries only its state."""
    from wove_adapters.core.codec import sign_events
    from wove_adapters.core.signing import encode_blob
    from wove_adapters.worker import runner as worker

    outcome = worker.execute(envelope, handle_sigterm=handle_sigterm)
    event = outcome.event
    assert event is not None
    detach = envelope.delivery.get("delivery_orphan_policy") == "detach"
    if not outcome.started and not detach:
        blob = encode_blob(sign_events([*outcome.logs, event], envelope.key_id))
        if len(blob) <= RETURNED_LIMIT:
            return blob
    worker.deliver_terminal(envelope, event, outcome)
    if not outcome.delivered:
        raise OutcomeUndelivered(
            f"run {envelope.run_id}: the worker could not deliver its outcome to "
            f"{envelope.return_path.url or envelope.return_path.kind}"
        )
    return outcome.state


def run_native(envelope: Envelope) -> Any:
    """``return_path: "native"``: the future carries the value (or the task's exception);
    a detached run also records it in the ledger, since no caller waits for the future.
    SIGTERM cancels the task where that can work (the worker's main thread)."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.worker import runner as worker

    detach = envelope.delivery.get("delivery_orphan_policy") == "detach" and envelope.ledger
    func, args = worker.load_task(envelope)  # WorkerImportError names host, pid, the fix
    try:
        with worker.sigterm_cancels():
            value = worker.call_task(func, args)
    except Exception as exc:
        if detach:
            worker._record_in_ledger(envelope, frames.TaskError(
                **envelope.outcome_ident, error=frames.normalize_exception(exc, source="task"),
                exception=worker.pickled_exception(exc),
            ))
        raise
    if detach:
        worker._record_in_ledger(
            envelope, frames.TaskResult(**envelope.outcome_ident,
                                        result=payload_mod.dumps(value)))
    return value


def worker_ready() -> str:
    """Probe ``doctor`` runs on every worker: it imports this package."""
    from importlib import metadata

    return f"wove-adapters {metadata.version('wove-adapters')} (pid {os.getpid()})"


def run_dask(payload: str, returned: bool = False) -> Any:
    """What a Dask worker runs: verify, run, report (or return, on the native path).
    ``returned``: the caller takes a short run's signed outcome from the future
    (``run_returned``); not part of the signed payload, it only picks the way back of
    events that are signed and checked either way.

    Runs in a Dask worker thread, so SIGTERM cannot interrupt it (``handle_sigterm`` is
    off: signal handlers belong to the main thread).
    """
    if is_chunk(payload):
        return run_chunk(payload, handle_sigterm=False)
    envelope = verified(payload)  # PayloadRefused: nothing unpickled, signed or sent
    if envelope.return_path.kind == "native":
        return run_native(envelope)
    if returned:
        return run_returned(envelope, handle_sigterm=False)
    return run_reported(envelope, handle_sigterm=False)


@dataclass(frozen=True)
class NativeCancelled:
    """What a cancelled payload returns to the caller through Ray's ObjectRef."""

    reason: str


def run_ray(payload: str, returned: bool = False) -> Any:
    """What a Ray worker runs: verify, run, report (or return, on the native path);
    ``returned`` as for ``run_dask``.

    Ray runs tasks on the worker's main thread, so both SIGTERM and ``ray.cancel``'s
    interrupt (a simulated SIGINT, ignored by Ray workers otherwise) cancel the task.
    """
    from wove_adapters.worker.runner import TaskCancelled

    # PayloadRefused: nothing unpickled, signed or sent.
    envelope = None if is_chunk(payload) else verified(payload)
    try:
        with interrupt_cancels():
            if envelope is None:
                return run_chunk(payload)
            if envelope.return_path.kind == "native":
                return run_native(envelope)
            if returned:
                return run_returned(envelope)
            return run_reported(envelope)
    except TaskCancelled as exc:  # interrupted outside the task body
        return NativeCancelled(str(exc))


def interrupt_cancels() -> AbstractContextManager[None]:
    """Within the block, ``ray.cancel``'s interrupt (SIGINT) raises TaskCancelled in the
    main thread; one handler per process, as for SIGTERM (``runner.SignalCancels``)."""
    return _interrupts().cancels()


@functools.cache
def _interrupts() -> Any:
    from wove_adapters.worker.runner import SignalCancels

    return SignalCancels(signal.SIGINT, "cancelled through ray.cancel")
