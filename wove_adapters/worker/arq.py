"""The ARQ worker side of the ``arq`` adapter: ``wove_adapters_run``, the job function a
deployment adds to its ``WorkerSettings.functions`` (importable from
``wove_adapters.adapters.arq`` too), and the small Redis keys both sides share.

A payload runs in a thread of the ARQ worker (``isolation="thread"``: the worker's loop is
never blocked) or in a payload process of the worker's warm pool (``isolation="process"``,
``worker.pool``), which an abort really stops. While it runs, the worker holds the job's
liveness lease (``worker.leases``). What the job ended with (its state, and the signed
outcome a keyed payload kept, ``worker.pool.run_payload``) is written, as msgpack, to our
own key ``wove-adapters:arq:result:<id>`` as well as returned to ARQ: ARQ serializes its
job results with the worker's ``job_serializer`` (pickle by default), which the caller
never loads. Nothing here builds or signs an event; a refused payload is recorded as
``refused`` and nothing is sent for it.

Nothing here imports ARQ at import time (it needs nothing from ARQ beyond the ``ctx``
dict ARQ passes), and it never imports the caller's side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from typing import Any

from wove_adapters.worker import leases
from wove_adapters.worker.pool import (
    PoolRun,
    ProcessPool,
    acknowledged,
    late_writes,
    report_to_caller,
    run_payload,
)

FUNCTION_NAME = "wove_adapters_run"
# Our own small keys next to ARQ's (``arq:job:<id>`` ...), keyed by job id.
CANCEL_KEY = "wove-adapters:arq:cancel:"  # the caller asked for this job to stop
DONE_KEY = "wove-adapters:arq:done:"  # a try that finished after ARQ cancelled it
LEASE_KEY = "wove-adapters:arq:lease:"  # renewed while a worker really runs the job
RESULT_KEY = "wove-adapters:arq:result:"  # what the job ended with (msgpack): the caller reads it
MARKER_TTL = 86_400
LEASE_SECONDS = 15.0


async def wove_adapters_run(
    ctx: dict[str, Any],
    payload: str,
    isolation: str = "thread",
    kill_after: float = 10.0,
    lease_seconds: float = LEASE_SECONDS,
) -> dict[str, Any]:
    """The ARQ job function: put it in ``WorkerSettings.functions``.

    Runs one signed payload (what ``await wove_adapters.worker.arun(payload)`` does: verify,
    run in a thread so the worker's loop is never blocked, heartbeat, report events) and
    returns a small dict ``{"state": ..., "outcome": <signed terminal event, keyed runs
    only>}`` that ARQ stores as the job result and that we record, as msgpack, under
    ``RESULT_KEY`` (what the caller reads). With ``isolation="process"`` the payload
    runs in a payload process of the worker's warm pool (``wove_adapters.worker.pool``)
    instead, which an abort really stops.

    An ARQ abort cancels this coroutine: in process isolation the child gets SIGTERM (it
    reports ``task_cancelled``), then SIGKILL after ``kill_after`` seconds. Any other
    cancellation (worker shutdown, ARQ's ``job_timeout``) lets the running task finish and
    deliver its outcome, and records it, so ARQ's retry of the job does not run it twice.
    A retry (``job_try > 1``) with no recorded outcome means the worker running it died:
    the caller is told the run was lost, and its orphan policy decides (``detach`` runs
    are run again, their outcome goes to the ledger).
    """
    redis = ctx.get("redis")
    job_id = str(ctx.get("job_id") or "")
    if redis is None or not job_id:
        return await _run_job(payload, isolation, kill_after, redis, job_id)
    result = await _run_try(ctx, payload, isolation, kill_after, lease_seconds)
    if acknowledged(result):  # nobody reads it but a caller that has the outcome: batched
        late_writes(redis).add("SET", RESULT_KEY + job_id, pack_record(result), "EX", MARKER_TTL)
    else:
        await redis.set(RESULT_KEY + job_id, pack_record(result), ex=MARKER_TTL)
    return result


async def _run_try(
    ctx: dict[str, Any], payload: str, isolation: str, kill_after: float, lease_seconds: float
) -> dict[str, Any]:
    redis, job_id = ctx["redis"], str(ctx["job_id"])
    job_try = int(ctx.get("job_try") or 1)
    # A record left by an earlier job with this id is not this job's: only a keyed run's
    # id comes again, and its caller removes such a record before it enqueues (ArqAdapter).
    if job_try > 1:
        recorded = await redis.get(DONE_KEY + job_id)
        if recorded:
            return read_record(recorded)
        if not await _rerun_allowed(payload, job_id, job_try):
            return {"state": "lost"}
    # The lease (see ArqAdapter.status_many): its first write waits a little, so a
    # short job never costs a Redis command for it.
    keeper = leases.keeper(redis)
    keeper.hold(LEASE_KEY + job_id, lease_seconds, first_after=min(1.0, lease_seconds / 3))
    try:
        return await _run_job(payload, isolation, kill_after, redis, job_id)
    finally:
        keeper.release(LEASE_KEY + job_id)


async def _run_job(
    payload: str, isolation: str, kill_after: float, redis: Any, job_id: str
) -> dict[str, Any]:
    child: PoolRun | None = None
    if isolation == "process":
        child = _processes().run(payload)
        work: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(_in_process(child))
    else:
        work = asyncio.ensure_future(
            asyncio.get_running_loop().run_in_executor(_threads(), _execute, payload)
        )
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        if redis is None or not job_id or await redis.exists(CANCEL_KEY + job_id):
            work.add_done_callback(_consume)
            if child is not None:  # SIGTERM now, SIGKILL after kill_after
                child.cancel(kill_after=kill_after)
                with contextlib.suppress(asyncio.CancelledError):
                    await child.wait(kill_after)
            # A thread cannot be interrupted; its late outcome is dropped by the caller.
            raise
        result = await _finish_anyway(work, redis, job_id)
        with contextlib.suppress(Exception):
            await redis.set(DONE_KEY + job_id, pack_record(result), ex=MARKER_TTL)
        raise


async def _finish_anyway(
    work: asyncio.Future[dict[str, Any]], redis: Any, job_id: str
) -> dict[str, Any]:
    """Wait for work ARQ gave up on, keeping ARQ's in-progress mark alive meanwhile so
    no other worker starts the job again."""
    from arq.constants import in_progress_key_prefix

    while True:
        try:
            done, _ = await asyncio.wait({work}, timeout=20)
        except asyncio.CancelledError:
            continue
        if done:
            try:
                return work.result()
            except BaseException as exc:  # recorded, not raised
                return {"state": "failed", "error": repr(exc)}
        with contextlib.suppress(Exception):
            await redis.pexpire(in_progress_key_prefix + job_id, 60_000)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_process_pool: ProcessPool | None = None


def _processes() -> ProcessPool:
    """``isolation="process"``: this worker's payload processes (``max_jobs`` bounds how
    many run at once; the zygote starts with the first such job)."""
    global _process_pool
    if _process_pool is None:
        _process_pool = ProcessPool()
    return _process_pool


def _threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads payloads run in (what ``arun`` does with the loop's default executor,
    which has only ``cpu_count + 4`` threads: a thread mostly waits for its terminal
    event's acknowledgement, so that would cap a worker's throughput well below its
    ``max_jobs``). Size: ``$WOVE_ADAPTERS_ARQ_THREADS`` (default 64); threads start on
    demand."""
    global _pool
    if _pool is None:
        size = int(os.environ.get("WOVE_ADAPTERS_ARQ_THREADS", "64"))
        _pool = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="wove-arq")
    return _pool


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def pack_record(result: dict[str, Any]) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(result)


def read_record(data: bytes) -> dict[str, Any]:
    """A record as msgpack (never pickle: the caller reads these too); raises
    ``msgspec.DecodeError`` for bytes that are not msgpack."""
    import msgspec

    value = msgspec.msgpack.decode(data)
    return value if isinstance(value, dict) else {"state": "failed"}


def _execute(payload: str) -> dict[str, Any]:
    """Run one payload in this worker thread; its terminal event goes back with those of
    the other threads' runs that end meanwhile (``pool.Terminals``)."""
    return _result(run_payload(payload, handle_sigterm=False, together=True))


async def _in_process(child: PoolRun) -> dict[str, Any]:
    """Run one payload in a payload process of the shared pool."""
    outcome = await child
    if outcome.report:
        return _result(outcome.report, exit_code=True)
    # Died without reporting (killed): tell the caller at once, unless we stopped it.
    if not child.cancelled:
        await report_to_caller(child.payload, "lost", str(outcome.notice))
    return {"state": "killed", "exit_code": outcome.exit_code}


def _result(report: dict[str, Any], *, exit_code: bool = False) -> dict[str, Any]:
    """ARQ's job result. Keyed runs keep a signed copy of their outcome in it, so another
    caller with the same key (another process, no shared ledger) gets it too."""
    if "run_id" not in report:  # refused before its envelope could be read
        return {"state": report["state"], "exit_code": report.get("exit_code")}
    result: dict[str, Any] = {
        "state": report["state"], "run_id": report["run_id"], "attempt": report["attempt"],
    }
    if not report.get("delivered", True):
        result["delivered"] = False
    if exit_code:
        result["exit_code"] = report.get("exit_code")
    if "outcome" in report:
        result["outcome"] = report["outcome"]
    return result


async def _rerun_allowed(payload: str, job_id: str, job_try: int) -> bool:
    """ARQ starts a job again when the worker that ran it died (its in-progress mark
    expired) or was stopped before it finished. Only ``detach`` runs, whose caller may be
    gone, run again; every other run is reported lost so its orphan policy applies."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError

    try:
        envelope = await asyncio.to_thread(payload_mod.decode_payload, payload)
    except PayloadError:
        return True  # run() refuses and reports it
    if envelope.delivery.get("delivery_orphan_policy") == "detach":
        return True
    await report_to_caller(
        payload, "lost",
        f"arq started job {job_id} again (try {job_try}): the worker running it stopped "
        f"without an outcome",
    )
    return False
