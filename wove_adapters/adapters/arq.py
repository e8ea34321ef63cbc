"""``arq``: tasks become jobs on an ARQ (asyncio + Redis) queue.

Caller side: one ``arq.create_pool`` client per adapter instance submits
``enqueue_job("wove_adapters_run", payload, _job_id=..., _queue_name=..., ...)``; the
sanitised idempotency key is the job id, so ARQ's own uniqueness gives one job per key
(a duplicate id makes ``enqueue_job`` return None: we attach to the existing job and
read its recorded, signed outcome). Events come back through the receiver (or the Redis
drop box); ``status()`` reads ARQ's job state for reconciliation.

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
import sys
import time
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core import frames
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
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
LEASE_TAIL = 60.0  # a lapsed lease stays readable this long, so its age can be told
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
    result_poll_delay: float = 0.05
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
        self._poll = float(config.get("result_poll_delay", 0.05))
        self._max_submits = int(config.get("max_concurrent_submits", 64))
        self._lease = float(config.get("lease_seconds", LEASE_SECONDS))
        if self._isolation == "process":
            self.capabilities = self.PROCESS_CAPABILITIES  # type: ignore[misc]
        self._pool: Any = None
        self._submits: asyncio.Semaphore | None = None
        self._queues: dict[str, str] = {}  # job id -> queue name
        self._watchers: dict[str, asyncio.Task[None]] = {}  # attached job id -> watcher
        self._let_go: set[str] = set()  # attached jobs this caller stopped following
        self._unleased: dict[str, float] = {}  # in-progress job id -> first seen unleased

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
        for task in self._watchers.values():
            task.cancel()
        self._watchers.clear()
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

    async def submit(self, job: JobSpec) -> str:
        assert self._pool is not None and self._submits is not None, "start() first"
        sources = [job.options, self.config]
        queue = str(_option(sources, "queue_name") or self._queue)
        enqueue: dict[str, Any] = {"_queue_name": queue}
        defer_until = _option(sources, "defer_until")
        if defer_until is not None:
            enqueue["_defer_until"] = _as_datetime(defer_until)
        else:
            defer_by = _option(sources, "defer_by")
            if defer_by is not None:
                enqueue["_defer_by"] = float(defer_by)
        expires = _option(sources, "expires")
        if expires is not None:
            enqueue["_expires"] = float(expires)
        if self._isolation == "process":
            enqueue["isolation"] = "process"
            enqueue["kill_after"] = self._kill_after
        if self._lease != LEASE_SECONDS:
            enqueue["lease_seconds"] = self._lease
        job_id = self.job_id(job)
        self._queues[job_id] = queue
        async with self._submits:
            for _ in range(3):
                created = await self._pool.enqueue_job(
                    self._function, job.payload, _job_id=job_id, **enqueue
                )
                if created is not None:
                    return job_id
                if await self._existing_holds_key(job_id, queue):
                    break
        # ARQ already has a job with this id (another caller, another process, or an
        # earlier run that succeeded): follow it instead of running the task again.
        self._watchers[job_id] = asyncio.get_running_loop().create_task(
            self._follow(job, job_id, queue)
        )
        return job_id

    async def _existing_holds_key(self, job_id: str, queue: str) -> bool:
        """A job with this id exists. Queued, running and succeeded jobs hold the key;
        a job that failed, was cancelled or was lost releases it (as the ledger does) so
        a retry runs again: its record is dropped and the caller enqueues afresh."""
        native, _ = await self._native(job_id, queue)
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

    async def _follow(self, job: JobSpec, job_id: str, queue: str) -> None:
        """Wait for an existing job (not ours) and hand its recorded outcome to our run."""
        try:
            while True:
                native, info = await self._native(job_id, queue)
                if native == "complete" and info is not None:
                    frame = await self._frame_from_result(job, job_id, info)
                    break
                if native == "not_found":
                    frame = frames.event(
                        frames.TASK_LOST, job.run_id, job.task_id, job.attempt,
                        reason=f"the arq job {job_id} this run follows is gone without a "
                               f"recorded outcome (keep_result=0, or it expired)",
                    )
                    break
                await asyncio.sleep(self._poll)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the follower's failure is the run's error
            frame = frames.error_event(
                job.run_id, job.task_id, exc, attempt=job.attempt, source="transport",
                retryable=True,
            )
        finally:
            self._watchers.pop(job_id, None)
        if self.emit is not None:
            self.emit(frame)

    async def _frame_from_result(self, job: JobSpec, job_id: str, info: Any) -> dict[str, Any]:
        ident = (job.run_id, job.task_id, job.attempt)
        result = info.result
        if not info.success:
            if isinstance(result, asyncio.CancelledError):
                return frames.event(frames.TASK_CANCELLED, *ident,
                                    reason=f"the arq job {job_id} was aborted")
            return frames.event(frames.TASK_LOST, *ident,
                                reason=f"the arq job {job_id} failed in arq: {result!r}")
        blob = result.get("outcome") if isinstance(result, dict) else None
        if not blob:
            return frames.event(
                frames.TASK_LOST, *ident,
                reason=f"the arq job {job_id} finished ({self._state_of(info).value}) "
                       f"without a recorded outcome",
            )
        from wove_adapters.core.codec import decode_outcome

        frame = await asyncio.to_thread(decode_outcome, bytes(blob))
        frame.update(run_id=job.run_id, task_id=job.task_id, attempt=job.attempt)
        return frame

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        assert self._pool is not None
        watcher = self._watchers.pop(handle, None)
        if watcher is not None:
            # Not our job: stop following it; it goes on for the caller that owns it.
            watcher.cancel()
            self._let_go.add(handle)
            return
        from arq.constants import abort_jobs_ss

        queue = self._queues.get(handle, self._queue)
        native, _ = await self._native(handle, queue)
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
        if handle in self._let_go:
            return JobState.CANCELLED
        native, info = await self._native(handle, self._queues.get(handle, self._queue))
        if native == "complete":
            self._unleased.pop(handle, None)
            return self._state_of(info) if info is not None else JobState.GONE
        if native == "in_progress":
            return await self._check_lease(handle)
        self._unleased.pop(handle, None)
        return self.map_state(native)

    async def _check_lease(self, handle: str) -> JobState:
        """ARQ keeps a job "in progress" for job_timeout + 10 s after its worker died;
        wove_adapters_run renews a lease while it really runs the job. A lease not
        renewed for ``lease_seconds`` (measured on Redis's clock), or none at all for that
        long (a job's first moments are unleased), means the worker is gone."""
        ttl = await self._pool.pttl(LEASE_KEY + handle)
        if ttl >= 0:
            self._unleased.pop(handle, None)
            since_renewal = (self._lease + LEASE_TAIL) * 1000 - ttl
            return JobState.GONE if since_renewal > self._lease * 1000 else JobState.RUNNING
        if ttl == -1:  # no expiry: not ours to judge
            return JobState.RUNNING
        first = self._unleased.setdefault(handle, time.monotonic())
        if time.monotonic() - first > self._lease:
            return JobState.GONE
        return JobState.RUNNING

    async def _native(self, job_id: str, queue: str) -> tuple[str, Any]:
        """ARQ's ``Job.status()`` (and ``result_info()`` once complete)."""
        from arq.constants import job_key_prefix
        from arq.jobs import Job

        assert self._pool is not None
        job = Job(job_id, self._pool, _queue_name=queue,
                  _deserializer=self._pool.job_deserializer)
        native = (await job.status()).value
        if native == "complete":
            return native, await job.result_info()
        if native == "not_found" and await self._pool.exists(job_key_prefix + job_id):
            return "queued", None  # enqueued under another queue name
        return native, None

    def _state_of(self, info: Any) -> JobState:
        if not info.success:
            if isinstance(info.result, asyncio.CancelledError):
                return JobState.CANCELLED
            return JobState.FAILED
        if isinstance(info.result, dict) and "state" in info.result:
            return self.map_state(info.result["state"])
        return JobState.SUCCEEDED

    async def detach(self, handle: str) -> None:
        watcher = self._watchers.pop(handle, None)
        if watcher is not None:
            watcher.cancel()

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
        if not await asyncio.to_thread(_rerun_allowed, payload, job_id, job_try):
            return {"state": "lost"}
    lease: asyncio.Task[None] | None = None
    if redis is not None and job_id:
        lease = asyncio.ensure_future(_hold_lease(redis, job_id, lease_seconds))
    try:
        return await _run_job(payload, isolation, kill_after, redis, job_id)
    finally:
        if lease is not None:
            lease.cancel()


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


async def _hold_lease(redis: Any, job_id: str, seconds: float) -> None:
    """Renew ``LEASE_KEY + job_id`` while the job runs here (see ArqAdapter.status). The
    first write waits a little: a short job never costs a Redis command for it."""
    import socket

    owner = f"{socket.gethostname()}:{os.getpid()}"
    await asyncio.sleep(min(1.0, seconds / 3))
    while True:
        with contextlib.suppress(Exception):
            await redis.set(LEASE_KEY + job_id, owner, px=int((seconds + LEASE_TAIL) * 1000))
        await asyncio.sleep(seconds / 3)


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


def _report_lost(envelope: Any, reason: str) -> None:
    from wove_adapters.worker import sender

    event = frames.TaskLost(
        run_id=envelope.run_id, task_id=envelope.task_id, attempt=envelope.attempt,
        reason=reason,
    )
    try:
        sender.send(envelope.return_path, envelope.key_id, event).result(timeout=60)
    except Exception as exc:  # the caller's reconciliation still finds it
        print(f"wove-adapters arq: could not report a lost run: {exc}", file=sys.stderr)


def _rerun_allowed(payload: str, job_id: str, job_try: int) -> bool:
    """ARQ starts a job again when the worker that ran it died (its in-progress mark
    expired) or was stopped before it finished. Only ``detach`` runs, whose caller may be
    gone, run again; every other run is reported lost so its orphan policy applies."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError

    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        return True  # run() refuses and reports it
    if envelope.delivery.get("delivery_orphan_policy") == "detach":
        return True
    _report_lost(
        envelope,
        f"arq started job {job_id} again (try {job_try}): the worker running it stopped "
        f"without an outcome",
    )
    return False
