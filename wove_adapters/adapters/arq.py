"""``arq``: tasks become jobs on an ARQ (asyncio + Redis) queue.

Caller side: one ``arq.create_pool`` client per adapter instance submits
``enqueue_job("wove_adapters_run", payload, _job_id=..., _queue_name=..., ...)``; the
sanitised idempotency key is the job id, so ARQ's own uniqueness gives one job per key
(a duplicate id makes ``enqueue_job`` return None: ``submit`` returns ``Following`` and
the transport reads the existing job's recorded, signed outcome through ``outcomes``).
Events come back through the receiver (or the Redis drop box); ``status_many`` reads
ARQ's job states and the workers' leases (``worker.leases``) in one transaction.

The caller never deserializes what ARQ keeps (job data and results are pickled by
default: anyone who can write to Redis would run code in the caller). ARQ's job states
come from which of its keys exist; what a complete job ended with, and a keyed run's
signed outcome, from the msgpack record ``wove_adapters_run`` writes
(``wove-adapters:arq:result:<id>``); the caller's pool refuses to deserialize anything.

Worker side: put :func:`wove_adapters_run` (``wove_adapters.worker.arq``, importable from
here too) in ``WorkerSettings.functions`` and run ``arq yourapp.WorkerSettings``
(``allow_abort_jobs = True`` for cancellation). A payload runs in a thread of the worker
(``isolation="thread"``, the default: the worker's loop is never blocked) or in a process
of its own (``isolation="process"``, forked from the shared warm pool): only the latter
can really interrupt running sync code, so only it claims ``cancel_running`` and
``confirm_cancel``. See docs/adapters/arq.md.

The library is imported inside methods only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.arq_reads import JobReads, never_deserialize, read_jobs, succeeded
from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker.arq import (
    CANCEL_KEY,
    DONE_KEY,
    FUNCTION_NAME,
    LEASE_SECONDS,
    MARKER_TTL,
    RESULT_KEY,
    pack_record,
    wove_adapters_run,
)
from wove_adapters.worker.leases import LeaseReader

__all__ = ["ArqAdapter", "ArqOptions", "wove_adapters_run"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "arq:queue"  # arq.constants.default_queue_name
ISOLATIONS = ("thread", "process")
_JOB_ID_CHARS = r"A-Za-z0-9_\-.:"
# ARQ's keys of a job id (job, in progress, result, retry) all gone: our records of an
# earlier job with that id (RESULT_KEY, DONE_KEY) go too (ArqAdapter._drop_stale_record).
_DROP_STALE_RECORD = """
if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3], KEYS[4]) == 0 then
  redis.call('DEL', KEYS[5], KEYS[6])
end
return 1
"""

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


def _arq_options(sources: list[dict[str, Any]]) -> dict[str, Any]:
    """ARQ's own ``enqueue_job`` keywords set in ``sources`` (the first one wins)."""
    enqueue: dict[str, Any] = {}
    if (queue := _option(sources, "queue_name")) is not None:
        enqueue["_queue_name"] = str(queue)
    if (defer_until := _option(sources, "defer_until")) is not None:
        enqueue["_defer_until"] = _as_datetime(defer_until)
    elif (defer_by := _option(sources, "defer_by")) is not None:
        enqueue["_defer_by"] = float(defer_by)
    if (expires := _option(sources, "expires")) is not None:
        enqueue["_expires"] = float(expires)
    return enqueue


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, (int, float)):
        return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
    return dt.datetime.fromisoformat(str(value))


def _worker_options(options: ArqOptions) -> dict[str, Any]:
    """``wove_adapters_run``'s keywords where they differ from its defaults; an unknown
    ``isolation`` is an error here, before anything connects."""
    if options.isolation not in ISOLATIONS:
        raise ValueError(
            f"arq executor_config.isolation must be one of {', '.join(ISOLATIONS)}, "
            f"not {options.isolation!r}"
        )
    worker: dict[str, Any] = {}
    if options.isolation == "process":
        worker.update(isolation="process", kill_after=options.kill_after)
    if options.lease_seconds != LEASE_SECONDS:
        worker["lease_seconds"] = options.lease_seconds
    return worker


def _aborted_result(pool: Any, function: str, handle: str, queue: str) -> bytes | None:
    """The result ARQ itself records for a job aborted before it started (its
    ``CancelledError``), serialized as the pool would."""
    from arq.jobs import serialize_result

    now = int(time.time() * 1000)
    return serialize_result(
        function, (), {}, 1, now, False,
        asyncio.CancelledError("cancelled before it started"), now, now,
        f"{handle}:{function}", queue, handle,
        serializer=pool.job_serializer,
    )


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
    required_modules = ("arq",)
    # isolation="thread" (default): ARQ's abort cancels the job's asyncio task, but the
    # thread running the task's code cannot be interrupted, so running work is NOT
    # stopped: cancel_running and confirm_cancel are False. Queued work is removed.
    capabilities = Capabilities.backend(
        cancel_running=False,
        confirm_cancel=False,
        native_idempotency=True,
        inline_payload_limit=1024 * 1024,
        chunks=True,
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
        "REFUSED": JobState.REFUSED,  # the worker could not verify the payload
        "LOST": JobState.FAILED,
        "KILLED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "ABORTED": JobState.CANCELLED,
    }
    reconcile_seconds: ClassVar[float] = 2.0

    options: ArqOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self._queue = str(_option([config], "queue_name") or DEFAULT_QUEUE)
        self._worker_options = _worker_options(self.options)
        if self._worker_options.get("isolation") == "process":
            self.capabilities = self.PROCESS_CAPABILITIES  # type: ignore[misc]
        self._pool: Any = None
        self._submits: asyncio.Semaphore | None = None
        self._queues: dict[str, str] = {}  # job id -> queue name, until released
        # A job's first moments are unleased: the worker writes its lease a second in.
        self._leases = LeaseReader(unleased_grace=self.options.lease_seconds)

    # ------------------------------------------------------------ life cycle

    def _settings(self) -> Any:
        from arq.connections import RedisSettings

        settings = RedisSettings.from_dsn(self.options.redis_url)
        settings.conn_retries = 1
        for key, value in self.options.redis_settings.items():
            if not hasattr(settings, key):
                raise ValueError(f"arq executor_config.redis_settings has unknown key {key!r}")
            setattr(settings, key, value)
        return settings

    async def start(self) -> None:
        from arq import create_pool

        try:
            self._pool = await create_pool(self._settings(), default_queue_name=self._queue,
                                           job_deserializer=never_deserialize)
        except Exception as exc:
            raise ConnectionError(
                f"arq: cannot reach Redis at {self.options.redis_url} "
                f"({type(exc).__name__}: {exc}). Start Redis (e.g. `redis-server "
                f"--daemonize yes --bind 127.0.0.1`) or set executor_config.redis_url."
            ) from exc
        self._submits = asyncio.Semaphore(self.options.max_concurrent_submits)

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
        return self.options.job_id_prefix + ident

    async def submit(self, job: JobSpec) -> str:
        assert self._pool is not None and self._submits is not None, "start() first"
        # ARQ's keywords (per run first), then ours for wove_adapters_run.
        enqueue = {"_queue_name": self._queue, **_arq_options([job.options, self.config]),
                   **self._worker_options}
        job_id = self.job_id(job)
        self._queues[job_id] = enqueue["_queue_name"]
        async with self._submits:
            if job.idempotency_key is not None:  # the only ids that come again
                await self._drop_stale_record(job_id)
            for _ in range(3):
                created = await self._pool.enqueue_job(
                    self.options.function, job.payload, _job_id=job_id, **enqueue
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

    async def _drop_stale_record(self, job_id: str) -> None:
        """Our record of an earlier job with this id whose ARQ keys are all gone (ARQ
        keeps a result for ``keep_result``, our record lives ``MARKER_TTL``) is not the
        next job's: removed, atomically with the check, before that job is enqueued. A
        job that still exists in any form keeps its record. (The worker no longer
        deletes it when the job starts: unkeyed job ids are never reused, and that was a
        Redis round trip per job.)"""
        from arq.constants import (
            in_progress_key_prefix,
            job_key_prefix,
            result_key_prefix,
            retry_key_prefix,
        )

        await self._pool.eval(
            _DROP_STALE_RECORD, 6,
            job_key_prefix + job_id, in_progress_key_prefix + job_id,
            result_key_prefix + job_id, retry_key_prefix + job_id,
            RESULT_KEY + job_id, DONE_KEY + job_id,
        )

    async def _existing_holds_key(self, job_id: str) -> bool:
        """A job with this id exists. Queued, running and succeeded jobs hold the key;
        a job that failed, was cancelled or was lost releases it (as the ledger does) so
        a retry runs again: its record is dropped and the caller enqueues afresh."""
        native, info, _ = (await self._read([job_id]))[job_id]
        if native != "complete":
            return native != "not_found"
        if not isinstance(info, Exception) and self._state_of(info) is JobState.SUCCEEDED:
            return True
        from arq.constants import result_key_prefix, retry_key_prefix

        key = result_key_prefix + job_id
        async with self._pool.pipeline(transaction=True) as pipe:
            await pipe.watch(key, RESULT_KEY + job_id)
            if await pipe.exists(key) == 0 or succeeded(await pipe.get(RESULT_KEY + job_id)):
                await pipe.reset()  # gone, or recorded a success meanwhile: look again
                return False
            pipe.multi()
            pipe.delete(key, retry_key_prefix + job_id, CANCEL_KEY + job_id, DONE_KEY + job_id,
                        RESULT_KEY + job_id)
            with contextlib.suppress(Exception):  # WatchError: someone else replaced it
                await pipe.execute()
        return False

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """The signed outcome each complete job's record keeps (keyed runs, see
        ``worker.arq``), for the transport to verify. A job that failed or was aborted
        is left out: reconciliation reports it (the run's orphan policy), the transport
        cancels an aborted one's followers."""
        found: dict[str, bytes | Exception] = {}
        for handle, (native, info, _) in (await self._read(handles)).items():
            if native != "complete":
                continue
            if isinstance(info, Exception):
                found[handle] = info
            elif isinstance(info.get("outcome"), bytes) and info["outcome"]:
                found[handle] = info["outcome"]
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
        aborted = _aborted_result(self._pool, self.options.function, handle, queue)
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
            pipe.set(RESULT_KEY + handle, pack_record({"state": "cancelled"}), ex=MARKER_TTL)
            try:
                await pipe.execute()
            except Exception:  # WatchError: a worker just started it
                return False
        return True

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

    async def _read(self, handles: Sequence[str]) -> JobReads:
        """``arq_reads.read_jobs``: ARQ's status from which of its keys exist (nothing of
        ARQ's is deserialized), our record of how a complete job ended, the lease."""
        assert self._pool is not None
        return await read_jobs(self._pool, handles, self._queues, self._queue)

    def _state_of(self, info: dict[str, Any]) -> JobState:
        return self.map_state(str(info.get("state") or "failed"))

    async def release(self, handle: str) -> None:
        self._queues.pop(handle, None)
        self._leases.forget(handle)

    async def doctor(self) -> list[tuple[str, bool, str]]:
        import arq.version  # a started adapter has ARQ (a missing one fails at start-up)

        rows = [("arq installed", True, f"arq {arq.version.VERSION}")]
        try:
            rows.append(await _broker_row(self._pool, self.options.redis_url))
        except Exception as exc:  # every failure is a row
            return [*rows, ("broker reachable", False,
                            f"Redis at {self.options.redis_url}: {exc}; start it or fix redis_url")]
        rows.append(await _worker_row(self._pool, self._queue))
        rows.append(await _backlog_row(self._pool, self._queue))
        return rows


# ---------------------------------------------------------------- doctor rows


async def _broker_row(pool: Any, redis_url: str) -> tuple[str, bool, str]:
    server = await pool.info(section="server")
    return ("broker reachable", True, f"Redis {server.get('redis_version', '?')} at {redis_url}")


async def _worker_row(pool: Any, queue: str) -> tuple[str, bool, str]:
    from arq.constants import health_check_key_suffix

    health = await pool.get(queue + health_check_key_suffix)
    if health:
        text = health.decode() if isinstance(health, bytes) else str(health)
        return ("worker listening on queue", True, f"{queue}: {text}")
    return (
        "worker listening on queue", False,
        f"no arq worker reports on queue {queue!r}: start one with "
        f"`arq yourapp.WorkerSettings` where WorkerSettings.functions includes "
        f"wove_adapters.adapters.arq.wove_adapters_run and queue_name = "
        f"{queue!r} (allow_abort_jobs = True for cancellation)",
    )


async def _backlog_row(pool: Any, queue: str) -> tuple[str, bool, str]:
    due = await pool.zcount(queue, "-inf", int(time.time() * 1000))
    oldest = await pool.zrange(queue, 0, 0, withscores=True)
    wait = (time.time() * 1000 - oldest[0][1]) / 1000 if oldest and due else 0.0
    return ("queue backlog", True, f"{due} due job(s), oldest waiting {wait:.1f}s")
