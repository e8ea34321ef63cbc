"""``arq``: tasks become jobs on an ARQ (asyncio + Redis) queue.

Caller side: one ``arq.create_pool`` client per adapter instance submits
``enqueue_job("wove_adapters_run", payload, _job_id=..., _queue_name=..., ...)``; the
sanitised idempotency key is the job id, so ARQ's own uniqueness gives one job per key
(a duplicate id makes ``enqueue_job`` return None: ``submit`` returns ``Following`` and
the transport reads the existing job's recorded, signed outcome through ``outcomes``).
Events come back through the receiver (or the Redis drop box); ``status_many`` reads
ARQ's job states and the workers' leases (``worker.leases``) in one transaction.

Worker side: put :func:`wove_adapters_run` in ``WorkerSettings.functions`` and run
``arq yourapp.WorkerSettings`` (``allow_abort_jobs = True`` for cancellation). A payload
runs in a thread of the worker (``isolation="thread"``, the default: the worker's loop is
never blocked) or in a process of its own (``isolation="process"``, forked from the
shared warm pool, ``wove_adapters.worker.pool``): only the latter can really interrupt
running sync code, so only it claims ``cancel_running`` and ``confirm_cancel``. See
docs/adapters/arq.md.

The library is imported inside methods only; the worker-side helpers need nothing from
ARQ beyond the ``ctx`` dict it passes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import os
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker import leases
from wove_adapters.worker.leases import LeaseReader
from wove_adapters.worker.pool import PoolRun, ProcessPool, report_to_caller, run_payload

FUNCTION_NAME = "wove_adapters_run"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "arq:queue"  # arq.constants.default_queue_name
ISOLATIONS = ("thread", "process")
# Our own small keys next to ARQ's (``arq:job:<id>`` ...), keyed by job id.
CANCEL_KEY = "wove-adapters:arq:cancel:"  # the caller asked for this job to stop
DONE_KEY = "wove-adapters:arq:done:"  # a try that finished after ARQ cancelled it
LEASE_KEY = "wove-adapters:arq:lease:"  # renewed while a worker really runs the job
MARKER_TTL = 86_400
LEASE_SECONDS = 15.0
_JOB_ID_CHARS = r"A-Za-z0-9_\-.:"

_OPTION_KEYS = {
    "queue_name": ("_queue_name", "queue_name", "queue"),
    "defer_by": ("_defer_by", "defer_by"),
    "defer_until": ("_defer_until", "defer_until"),
    "expires": ("_expires", "expires"),
}


def _option(sources: list[dict[str, Any]], name: str) -> Any:
    """The first value of ``name`` (with or without ARQ's leading underscore)."""
    for source in sources:
        for key in _OPTION_KEYS[name]:
            if source.get(key) is not None:
                return source[key]
    return None


class ArqOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``arq`` (docs/adapters/arq.md, "Configuration")."""

    redis_url: str = DEFAULT_REDIS_URL
    # Any other arq.connections.RedisSettings field (password, ssl, conn_timeout, ...).
    redis_settings: dict[str, Any] = {}
    # The queue the worker reads; ARQ's own spelling and ours are all accepted.
    queue_name: str | None = None
    _queue_name: str | None = None
    queue: str | None = None
    function: str = FUNCTION_NAME
    job_id_prefix: str = ""
    isolation: str = "thread"  # or "process"
    kill_after: float = 10.0
    max_concurrent_submits: int = 64
    lease_seconds: float = LEASE_SECONDS
    # ARQ's enqueue options, with or without its leading underscore.
    defer_by: float | None = None
    _defer_by: float | None = None
    defer_until: Any = None  # a datetime, an ISO string or epoch seconds
    _defer_until: Any = None
    expires: float | None = None
    _expires: float | None = None


class ArqAdapter(BackendAdapter):
    name = "arq"
    config_struct = ArqOptions
    extra = "arq"
    required_modules = ("arq",)
    # isolation="thread" (default): ARQ's abort cancels the job's asyncio task, but the
    # thread running the task's code cannot be interrupted, so running work is NOT
    # stopped: cancel_running and confirm_cancel are False. Queued work is removed.
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=False,
        confirm_cancel=False,
        native_idempotency=True,
        native_result=False,
        status=True,
        requeue=True,
        detach=True,
        heartbeats=True,
        inline_payload_limit=1024 * 1024,
        array_jobs=False,
    )
    # isolation="process": the payload runs in a child process the worker SIGTERMs on
    # abort (SIGKILL after ``kill_after``): running work really stops, and the child's
    # task_cancelled (or ARQ's aborted state) confirms it.
    PROCESS_CAPABILITIES: ClassVar[Capabilities] = dataclasses.replace(
        capabilities, cancel_running=True, confirm_cancel=True
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        # arq.jobs.JobStatus
        "DEFERRED": JobState.PENDING,
        "QUEUED": JobState.PENDING,
        "IN_PROGRESS": JobState.RUNNING,
        "COMPLETE": JobState.SUCCEEDED,
        "NOT_FOUND": JobState.GONE,
        # a complete job, refined by its result (ours: the dict wove_adapters_run returns)
        "SUCCEEDED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "REFUSED": JobState.FAILED,
        "LOST": JobState.FAILED,
        "KILLED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "ABORTED": JobState.CANCELLED,
    }
    reconcile_seconds: ClassVar[float] = 2.0

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self._redis_url = str(config.get("redis_url") or DEFAULT_REDIS_URL)
        self._redis_settings = dict(config.get("redis_settings") or {})
        self._queue = str(_option([config], "queue_name") or DEFAULT_QUEUE)
        self._function = str(config.get("function") or FUNCTION_NAME)
        self._prefix = str(config.get("job_id_prefix") or "")
        self._isolation = str(config.get("isolation") or "thread")
        if self._isolation not in ISOLATIONS:
            raise ValueError(
                f"arq executor_config.isolation must be one of {', '.join(ISOLATIONS)}, "
                f"not {self._isolation!r}"
            )
        self._kill_after = float(config.get("kill_after", 10.0))
        self._max_submits = int(config.get("max_concurrent_submits", 64))
        self._lease = float(config.get("lease_seconds", LEASE_SECONDS))
        if self._isolation == "process":
            self.capabilities = self.PROCESS_CAPABILITIES  # type: ignore[misc]
        self._pool: Any = None
        self._submits: asyncio.Semaphore | None = None
        self._queues: dict[str, str] = {}  # job id -> queue name, until released
        # A job's first moments are unleased: the worker writes its lease a second in.
        self._leases = LeaseReader(unleased_grace=self._lease)

    # ------------------------------------------------------------ life cycle

    def _settings(self) -> Any:
        from arq.connections import RedisSettings

        settings = RedisSettings.from_dsn(self._redis_url)
        settings.conn_retries = 1
        for key, value in self._redis_settings.items():
            if not hasattr(settings, key):
                raise ValueError(f"arq executor_config.redis_settings has unknown key {key!r}")
            setattr(settings, key, value)
        return settings

    async def start(self) -> None:
        from arq import create_pool

        try:
            self._pool = await create_pool(self._settings(), default_queue_name=self._queue)
        except Exception as exc:
            raise ConnectionError(
                f"arq: cannot reach Redis at {self._redis_url} ({type(exc).__name__}: {exc}). "
                f"Start Redis (e.g. `redis-server --daemonize yes --bind 127.0.0.1`) or set "
                f"executor_config.redis_url."
            ) from exc
        self._submits = asyncio.Semaphore(self._max_submits)

    async def aclose(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                aclose = getattr(self._pool, "aclose", None)  # redis-py >= 5.0.1
                if aclose is not None:
                    await aclose()
                else:
                    await self._pool.close(close_connection_pool=True)
            self._pool = None

    # ------------------------------------------------------------ submit

    def job_id(self, job: JobSpec) -> str:
        """The ARQ job id: the sanitised idempotency key (attempt 1; a requeued attempt
        gets ``~N``, a character sanitising never produces), else the run's job name."""
        if job.idempotency_key is not None:
            base = self.safe_name(job.idempotency_key, allowed=_JOB_ID_CHARS)
            ident = base if job.attempt == 1 else f"{base}~{job.attempt}"
        else:
            ident = job.job_name
        return self._prefix + ident

    def _enqueue_options(self, job: JobSpec) -> dict[str, Any]:
        """``enqueue_job`` keywords: ARQ's (per run first), then ours for the worker."""
        sources = [job.options, self.config]
        queue = str(_option(sources, "queue_name") or self._queue)
        enqueue: dict[str, Any] = {"_queue_name": queue}
        defer_until = _option(sources, "defer_until")
        if defer_until is not None:
            enqueue["_defer_until"] = _as_datetime(defer_until)
        elif (defer_by := _option(sources, "defer_by")) is not None:
            enqueue["_defer_by"] = float(defer_by)
        expires = _option(sources, "expires")
        if expires is not None:
            enqueue["_expires"] = float(expires)
        if self._isolation == "process":
            enqueue["isolation"] = "process"
            enqueue["kill_after"] = self._kill_after
        if self._lease != LEASE_SECONDS:
            enqueue["lease_seconds"] = self._lease
        return enqueue

    async def submit(self, job: JobSpec) -> str:
        assert self._pool is not None and self._submits is not None, "start() first"
        enqueue = self._enqueue_options(job)
        job_id = self.job_id(job)
        self._queues[job_id] = enqueue["_queue_name"]
        async with self._submits:
            for _ in range(3):
                created = await self._pool.enqueue_job(
                    self._function, job.payload, _job_id=job_id, **enqueue
                )
                if created is not None:
                    return job_id
                if await self._existing_holds_key(job_id):
                    break
        # ARQ already has a job with this id (another caller, another process, or an
        # earlier run that succeeded): the transport follows it (``outcomes``) instead
        # of running the task again.
        self._queues.pop(job_id, None)
        return Following(job_id)

    async def _existing_holds_key(self, job_id: str) -> bool:
        """A job with this id exists. Queued, running and succeeded jobs hold the key;
        a job that failed, was cancelled or was lost releases it (as the ledger does) so
        a retry runs again: its record is dropped and the caller enqueues afresh."""
        native, _, _ = (await self._read([job_id]))[job_id]
        if native != "complete":
            return native != "not_found"
        from arq.constants import result_key_prefix, retry_key_prefix
        from arq.jobs import deserialize_result

        key = result_key_prefix + job_id
        async with self._pool.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            raw = await pipe.get(key)
            if raw is None:
                await pipe.reset()
                return False
            info = deserialize_result(raw, deserializer=self._pool.job_deserializer)
            if self._state_of(info) is JobState.SUCCEEDED:
                await pipe.reset()
                return True
            pipe.multi()
            pipe.delete(key, retry_key_prefix + job_id, CANCEL_KEY + job_id, DONE_KEY + job_id)
            with contextlib.suppress(Exception):  # WatchError: someone else replaced it
                await pipe.execute()
        return False

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """The signed outcome each complete job keeps in its ARQ result (keyed runs, see
        ``_result``). A job that failed in ARQ or was aborted is left out: reconciliation
        reports it (the run's orphan policy), the transport cancels an aborted one's
        followers."""
        found: dict[str, bytes | Exception] = {}
        for handle, (native, info, _) in (await self._read(handles)).items():
            if native != "complete":
                continue
            if isinstance(info, Exception):
                found[handle] = info
            elif info.success and isinstance(info.result, dict) and info.result.get("outcome"):
                found[handle] = bytes(info.result["outcome"])
            elif self._state_of(info) is JobState.SUCCEEDED:
                found[handle] = RuntimeError(
                    f"the arq job {handle} holding this idempotency key finished without a "
                    f"recorded outcome (a worker older than this caller?)"
                )
        return found

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        assert self._pool is not None
        from arq.constants import abort_jobs_ss

        queue = self._queues.get(handle, self._queue)
        native, _, _ = (await self._read([handle]))[handle]
        if native in ("complete", "not_found"):
            return
        if native in ("queued", "deferred") and await self._remove_queued(handle, queue):
            return
        if native == "in_progress" and not running:
            return
        # Running (or started meanwhile): what Job.abort() does, without waiting for it.
        now = int(time.time() * 1000)
        async with self._pool.pipeline(transaction=True) as pipe:
            pipe.set(CANCEL_KEY + handle, b"1", ex=MARKER_TTL)
            if native == "deferred":
                pipe.zadd(queue, {handle: 1})  # bring it forward so a worker sees the abort
            pipe.zadd(abort_jobs_ss, {handle: now})
            await pipe.execute()

    async def _remove_queued(self, handle: str, queue: str) -> bool:
        """Take a job no worker has started off the queue, recording it aborted (the
        result ARQ itself records for an aborted job: ``CancelledError``). False if a
        worker started it meanwhile."""
        from arq.constants import (
            in_progress_key_prefix,
            job_key_prefix,
            result_key_prefix,
            retry_key_prefix,
        )
        from arq.jobs import serialize_result

        now = int(time.time() * 1000)
        aborted = serialize_result(
            self._function, (), {}, 1, now, False,
            asyncio.CancelledError("cancelled before it started"), now, now,
            f"{handle}:{self._function}", queue, handle,
            serializer=self._pool.job_serializer,
        )
        async with self._pool.pipeline(transaction=True) as pipe:
            await pipe.watch(in_progress_key_prefix + handle)
            if await pipe.exists(in_progress_key_prefix + handle):
                await pipe.reset()
                return False
            pipe.multi()
            pipe.zrem(queue, handle)
            pipe.delete(job_key_prefix + handle, retry_key_prefix + handle)
            if aborted is not None:
                pipe.set(result_key_prefix + handle, aborted, px=3_600_000)
            try:
                await pipe.execute()
            except Exception:  # WatchError: a worker just started it
                return False
        return True

    async def status(self, handle: str) -> JobState:
        return (await self.status_many([handle])).get(handle, JobState.UNKNOWN)

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """One Redis transaction for every job asked about (``_read``). ARQ keeps a job
        "in progress" for job_timeout + 10 s after its worker died; wove_adapters_run
        holds a lease (``worker.leases``) while it really runs the job: a lapsed one, or
        none at all for ``lease_seconds`` (a job's first moments are unleased), means
        the worker is gone."""
        states: dict[str, JobState] = {}
        for handle, (native, info, pttl) in (await self._read(handles)).items():
            if native == "in_progress":
                alive = self._leases.alive(handle, pttl)
                states[handle] = JobState.RUNNING if alive else JobState.GONE
                continue
            self._leases.forget(handle)
            if native != "complete":
                states[handle] = self.map_state(native)
            elif not isinstance(info, Exception):  # an unreadable record: no verdict
                states[handle] = self._state_of(info)
        return states

    async def _read(self, handles: Sequence[str]) -> dict[str, tuple[str, Any, int]]:
        """``{job id: (ARQ's status, its result, the lease's PTTL)}``: what ``Job.status()``
        and ``Job.result_info()`` read, for every job in one transaction. The result is
        a ``JobResult`` once complete (an Exception if it does not deserialize)."""
        from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
        from arq.jobs import deserialize_result

        assert self._pool is not None
        async with self._pool.pipeline(transaction=True) as pipe:
            for handle in handles:
                pipe.get(result_key_prefix + handle)
                pipe.exists(in_progress_key_prefix + handle)
                pipe.zscore(self._queues.get(handle, self._queue), handle)
                pipe.exists(job_key_prefix + handle)
                pipe.pttl(LEASE_KEY + handle)
            replies = await pipe.execute()
        now = time.time() * 1000
        found: dict[str, tuple[str, Any, int]] = {}
        for i, handle in enumerate(handles):
            raw, in_progress, score, enqueued, pttl = replies[5 * i : 5 * i + 5]
            info: Any = None
            if raw:
                native = "complete"
                try:
                    info = deserialize_result(raw, deserializer=self._pool.job_deserializer)
                except Exception as exc:
                    info = exc
            elif in_progress:
                native = "in_progress"
            elif score:
                native = "deferred" if score > now else "queued"
            else:  # the job key may sit in another queue than the one we know
                native = "queued" if enqueued else "not_found"
            found[handle] = (native, info, int(pttl))
        return found

    def _state_of(self, info: Any) -> JobState:
        if not info.success:
            if isinstance(info.result, asyncio.CancelledError):
                return JobState.CANCELLED
            return JobState.FAILED
        if isinstance(info.result, dict) and "state" in info.result:
            return self.map_state(info.result["state"])
        return JobState.SUCCEEDED

    async def release(self, handle: str) -> None:
        self._queues.pop(handle, None)
        self._leases.forget(handle)

    # ------------------------------------------------------------ doctor

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            import arq.version

            rows.append(("arq installed", True, f"arq {arq.version.VERSION}"))
        except ImportError:
            return [("arq installed", False, "pip install 'wove-adapters[arq]'")]
        pool = self._pool
        if pool is None:
            return [*rows, ("broker reachable", False, "the adapter is not started")]
        try:
            server = await pool.info(section="server")
            rows.append(("broker reachable", True,
                         f"Redis {server.get('redis_version', '?')} at {self._redis_url}"))
        except Exception as exc:  # every failure is a row
            return [*rows, ("broker reachable", False,
                            f"Redis at {self._redis_url}: {exc}; start it or fix redis_url")]
        from arq.constants import health_check_key_suffix

        health = await pool.get(self._queue + health_check_key_suffix)
        if health:
            text = health.decode() if isinstance(health, bytes) else str(health)
            rows.append(("worker listening on queue", True, f"{self._queue}: {text}"))
        else:
            rows.append((
                "worker listening on queue", False,
                f"no arq worker reports on queue {self._queue!r}: start one with "
                f"`arq yourapp.WorkerSettings` where WorkerSettings.functions includes "
                f"wove_adapters.adapters.arq.wove_adapters_run and queue_name = "
                f"{self._queue!r} (allow_abort_jobs = True for cancellation)",
            ))
        due = await pool.zcount(self._queue, "-inf", int(time.time() * 1000))
        oldest = await pool.zrange(self._queue, 0, 0, withscores=True)
        wait = (time.time() * 1000 - oldest[0][1]) / 1000 if oldest and due else 0.0
        rows.append(("queue backlog", True, f"{due} due job(s), oldest waiting {wait:.1f}s"))
        return rows


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    return dt.datetime.fromisoformat(str(value))


# ====================================================================== worker side


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
    only>}`` that ARQ stores as the job result. With ``isolation="process"`` the payload
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
    job_try = int(ctx.get("job_try") or 1)
    if job_try > 1 and redis is not None and job_id:
        recorded = await redis.get(DONE_KEY + job_id)
        if recorded:
            return _unpack(recorded)
        if not await _rerun_allowed(payload, job_id, job_try):
            return {"state": "lost"}
    if redis is None or not job_id:
        return await _run_job(payload, isolation, kill_after, redis, job_id)
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
            await redis.set(DONE_KEY + job_id, _pack(result), ex=MARKER_TTL)
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


def _pack(result: dict[str, Any]) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(result)


def _unpack(data: bytes) -> dict[str, Any]:
    import msgspec

    value = msgspec.msgpack.decode(data)
    return value if isinstance(value, dict) else {"state": "failed"}


def _execute(payload: str) -> dict[str, Any]:
    """Run one payload in this worker thread."""
    return _result(run_payload(payload, handle_sigterm=False))


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
