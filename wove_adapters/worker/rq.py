"""The RQ worker side of the ``rq`` adapter: ``run_payload``, the job function every run
calls (by its dotted name ``wove_adapters.adapters.rq.run_payload``, re-exported there),
and the preloading ``Worker`` (``rq worker -w wove_adapters.adapters.rq.Worker``).

``run_payload`` records its run's state, and a keyed run's signed outcome (base64), in
its job's hash (``wove_state``, ``wove_outcome``), where the caller reads them as plain
text: the job's result is serialized with this worker's serializer (pickle by default),
which the caller never loads. A refused payload is recorded as ``refused`` and nothing
is signed or sent for it.

Nothing here imports rq at import time, and it never imports the caller's side.
"""

from __future__ import annotations

import contextlib
from typing import Any

from wove_adapters.core.policies import RunState

# The fields run_payload writes into its job's hash, read raw by the caller (never unpickled).
STATE_FIELD = "wove_state"
OUTCOME_FIELD = "wove_outcome"


def run_payload(payload: str) -> bytes | str:
    """The RQ job function: ``queue.enqueue("wove_adapters.adapters.rq.run_payload", text)``.

    Runs the payload with ``wove_adapters.worker.runner`` (verify, run, heartbeat,
    report). Returns the state, or, for a run with an idempotency key, the signed terminal
    event, which RQ keeps as the job's result for a later caller with the same key. Raises
    when the outcome could not be delivered anywhere, so RQ marks the job failed.
    """
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core import frames
    from wove_adapters.core.errors import PayloadError
    from wove_adapters.worker import runner as worker

    if payload_mod.is_chunk(payload):
        return _run_chunk(payload)
    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        # Refused: signs and sends nothing; the job's hash says so (status_many).
        return _record(worker.run(payload).state.value)
    if _cancelled_before_start():
        outcome = worker.Outcome(RunState.CANCELLED)
        worker.deliver_terminal(
            envelope,
            frames.TaskCancelled(**envelope.outcome_ident, reason="cancelled before it started"),
            outcome,
        )
        outcome.settle(linger=True)
        return _record(outcome.state.value)
    outcome = worker.run_envelope(envelope)
    # RQ's work-horse ends with os._exit right after this job (no exit hooks run): the
    # outcome must be delivered or recorded in the ledger before we return, and a caller
    # that is only briefly unreachable gets worker_exit_flush_seconds (default 10) to
    # take it directly. A caller that is gone costs the worker that long, not 120 s.
    outcome.settle(linger=True)
    if not outcome.delivered:
        raise RuntimeError(
            f"wove-adapters: the outcome of run {envelope.run_id} could not be delivered "
            f"to {envelope.return_path.kind} {envelope.return_path.url}"
        )
    keyed = envelope.delivery.get("delivery_idempotency_key") is not None
    if not keyed and outcome.pending is None:
        return _record(outcome.state.value)
    # Kept in the job's hash for another caller that holds the same key (and as the
    # job's result, for callers older than the hash field), and when the caller did not
    # acknowledge it within the grace (the ledger has it too; the job's own record is
    # where a caller without a shareable ledger can find it).
    signed = outcome.signed()
    _record(outcome.state.value, signed)
    if keyed and signed:
        return signed
    return outcome.state.value


def _run_chunk(payload: str) -> str:
    """A chunk (``worker.chunks``): its runs report for themselves. The work-horse exits
    after it, so every outcome is delivered or recorded first, as for a single run."""
    from wove_adapters.worker import chunks

    if _cancelled_before_start():
        return _record(RunState.CANCELLED.value)  # every run of it was cancelled
    done = chunks.run_chunk(payload)
    if done.state is not RunState.REFUSED and not done.settle(linger=True):
        raise RuntimeError(f"wove-adapters: outcomes of a chunk were not delivered: "
                           f"{done.summary()}")
    return _record(done.state.value)


def _record(state: str, signed: bytes | None = None) -> str:
    """Write the run's state (and a keyed run's signed outcome, base64) into this job's
    hash, where the caller reads them as plain text: the job's result is serialized by
    this worker's serializer (pickle by default), which the caller never loads."""
    import base64

    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        fields = {STATE_FIELD: state}
        if signed:
            fields[OUTCOME_FIELD] = base64.b64encode(signed).decode("ascii")
        job.connection.hset(job.key, mapping=fields)
    return state


def _cancelled_before_start() -> bool:
    """True when the caller cancelled this job after a worker took it from the queue but
    before the job function ran: RQ's Job.cancel marks it canceled and the worker then
    marks it started over that, but the job stays in the queue's canceled registry."""
    from rq import get_current_job
    from rq.registry import CanceledJobRegistry

    job = get_current_job()
    if job is None:
        return False
    try:
        registry = CanceledJobRegistry(job.origin, connection=job.connection)
        return job.id in registry
    except Exception:  # a failed check must not lose the run: run it
        return False


def _preload() -> None:
    """Import what every payload needs once in the worker, so a forked work-horse starts
    warm instead of importing ~0.2 s of modules per job."""
    import importlib

    for name in ("cloudpickle", "msgspec", "aiohttp", "redis.asyncio",
                 "wove_adapters.worker.runner", "wove_adapters.worker.sender",
                 "wove_adapters.core.envelope", "wove_adapters.core.runtime"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


_worker_class: type | None = None


def _make_worker_class() -> type:
    from rq import Worker as RqWorker

    class Worker(RqWorker):
        """``rq worker -w wove_adapters.adapters.rq.Worker``: RQ's forking worker with the
        payload runner imported before the first fork."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _preload()
            super().__init__(*args, **kwargs)

    Worker.__module__ = "wove_adapters.adapters.rq"  # the name deployments pass to -w
    return Worker


def __getattr__(name: str) -> Any:
    """``Worker`` is built on first access, so importing this module never imports rq."""
    global _worker_class
    if name == "Worker":
        if _worker_class is None:
            _worker_class = _make_worker_class()
        return _worker_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
