"""``rq``: every run is one RQ job that calls ``wove_adapters.adapters.rq.run_payload``.

The caller enqueues the signed payload text as the job's only argument; any ``rq worker``
that has ``wove-adapters`` installed runs it (its work-horse verifies, runs, heartbeats and
reports back through the run's return path). Job ids are the sanitised idempotency key
(RQ 2.x and 3.x ids allow only letters, digits, ``_`` and ``-``), so the same key is one RQ
job across callers; a key whose job already finished answers with the signed outcome the
job recorded in its hash. Cancel removes a queued job (``Job.cancel``) or kills a
running one's work-horse (the ``stop-job`` command); RQ then marks the job STOPPED,
which confirms ``require_ack``. ``status_many`` reads every asked job's RQ status in one
pipelined ``HMGET``.

Nothing the caller reads from Redis is unpickled (anyone who can write to RQ's Redis
would run code in the caller): it reads the job hash fields it needs as plain text with
``HMGET`` (status, worker, origin, and the ``wove_state`` and ``wove_outcome`` fields
``run_payload`` writes), never builds a ``Job`` from Redis (``Job.fetch`` unpickles its
meta, ``return_value()`` its result), and its ``Job`` objects carry a serializer that
refuses to load anything (those raw reads live in ``rq_reads``). A signed outcome goes
through ``core.codec.decode_outcome``.

This module never imports ``rq`` or ``redis`` at import time: the worker-side pieces
(``run_payload`` and the preloading ``Worker`` class, reached through ``__getattr__``)
must load in a worker without the caller's configuration, and ``core`` must not depend
on RQ. Every blocking redis/RQ call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.rq_reads import (
    CallerSerializer,
    caller_job,
    read_fields,
    recorded_outcomes,
    subscribed,
)
from wove_adapters.core.aio import ThreadHops
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState, RunState
from wove_adapters.worker.rq import STATE_FIELD, run_payload

__all__ = ["RqAdapter", "RqOptions", "run_payload"]

RUN_PAYLOAD = "wove_adapters.adapters.rq.run_payload"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "wove"
# How long a cancelled job's hash stays readable (seconds), unless failure_ttl is set.
CANCELLED_TTL = 86400
# executor_config / task_options keys handed to ``Queue.enqueue_call`` (ours -> RQ's).
_ENQUEUE_OPTIONS = {
    "job_timeout": "timeout",
    "result_ttl": "result_ttl",
    "failure_ttl": "failure_ttl",
    "ttl": "ttl",
    "at_front": "at_front",
    "description": "description",
}
# RQ statuses under which a job with our id still counts as the key's one execution.
_HOLDS_KEY = {"created", "queued", "started", "deferred", "scheduled", "finished",
              "rate_limited", "ready_to_enqueue"}
# A started job's worker must be seen gone in two status rounds at least this far apart.
_ROUND_SECONDS = 0.25
_CANCELLABLE = {"created", "queued", "deferred", "scheduled", "rate_limited", "ready_to_enqueue"}
_ENDED = {"finished", "failed", "stopped", "canceled"}


class RqOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``rq`` (docs/adapters/rq.md)."""

    redis_url: str = DEFAULT_REDIS_URL
    redis_options: dict[str, Any] = {}  # more redis.Redis.from_url keyword arguments
    queue: str = DEFAULT_QUEUE
    # Queue.enqueue_call options for every job (_ENQUEUE_OPTIONS, also per task).
    job_timeout: int | str | None = None
    result_ttl: int | None = None
    failure_ttl: int | None = None
    ttl: int | None = None
    at_front: bool = False
    description: str | None = None
    meta: dict[str, Any] = {}


class RqAdapter(BackendAdapter):
    name = "rq"
    config_struct = RqOptions
    required_modules = ("rq", "redis")
    capabilities = Capabilities.backend(
        cancel_running=True,  # send_stop_job_command: the work-horse is SIGKILLed
        confirm_cancel=True,  # RQ marks the job STOPPED / CANCELED: status() confirms
        native_idempotency=True,  # job_id = sanitised idempotency key
        inline_payload_limit=1024 * 1024,
        chunks=True,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "CREATED": JobState.PENDING,
        "QUEUED": JobState.PENDING,
        "DEFERRED": JobState.PENDING,
        "SCHEDULED": JobState.PENDING,
        "RATE_LIMITED": JobState.PENDING,
        "READY_TO_ENQUEUE": JobState.PENDING,
        "STARTED": JobState.RUNNING,
        "FINISHED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "STOPPED": JobState.CANCELLED,
        "CANCELED": JobState.CANCELLED,
        "REFUSED": JobState.REFUSED,  # ours: the worker refused the payload (run_payload)
        "ABANDONED": JobState.GONE,  # ours: started, but its worker is gone (status())
    }
    reconcile_seconds: ClassVar[float] = 1.0
    # RQ's work-horse ends with its job, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "settled"

    options: RqOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.redis_url = self.options.redis_url
        self.queue_name = self.options.queue
        self._defaults = {k: config[k] for k in (*_ENQUEUE_OPTIONS, "meta") if k in config}
        self._connection: Any = None
        self._queues: dict[str, Any] = {}
        self._unique = False
        self._worker_gone: dict[str, float] = {}  # handle -> when its worker was first gone
        # Enqueues of one loop iteration share thread hops (asyncio's default threads).
        self._hops = ThreadHops(None, 4)

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        import redis
        from rq import Queue

        self._connection = redis.Redis.from_url(self.redis_url, **self.options.redis_options)
        try:
            self._connection.ping()
        except redis.RedisError as exc:
            raise ConnectionError(
                f"rq adapter: Redis at {self.redis_url} is unreachable ({exc}); start it "
                f"(redis-server --daemonize yes --bind 127.0.0.1) or set "
                f"executor_config.redis_url"
            ) from exc
        # Newer RQ (2.12, 3.0) enqueues a job id atomically only if it is new; else check first.
        self._unique = "unique" in inspect.signature(Queue.enqueue_call).parameters

    async def aclose(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            await asyncio.to_thread(connection.close)

    def _queue(self, name: str) -> Any:
        queue = self._queues.get(name)
        if queue is None:
            from rq import Queue

            queue = self._queues[name] = Queue(
                name, connection=self._connection, serializer=CallerSerializer
            )
        return queue

    def _fields(self, handles: Sequence[str], *fields: str) -> list[list[str | None]]:
        return read_fields(self._connection, handles, *fields)

    # ------------------------------------------------------------ submit

    def job_id(self, job: JobSpec) -> str:
        """The RQ job id: the sanitised key (a requeued attempt gets its own id, so a
        dying attempt's bookkeeping never touches its successor), else the job name."""
        if job.idempotency_key is None:
            return job.job_name
        if job.attempt <= 1:
            return self.safe_name(job.idempotency_key)
        return self.safe_name(f"{job.idempotency_key}#{job.attempt}")

    async def submit(self, job: JobSpec) -> str:
        options = {**self._defaults, **job.options}
        job_id = self.job_id(job)
        found = await self._hops.call(self._enqueue, job, job_id, options)
        if found is not None:  # another caller's job holds this key: the transport follows
            return Following(job_id)
        return job_id

    def _enqueue(self, job: JobSpec, job_id: str, options: dict[str, Any]) -> str | None:
        """Enqueue unless a job with this id already holds the key; returns that job's
        status when it does, None when we enqueued."""
        queue = self._queue(str(options.get("queue") or self.queue_name))
        kwargs = _enqueue_options(job, options)
        deduped = job.idempotency_key is not None
        for _ in range(5):
            if deduped:
                status, origin = self._fields([job_id], "status", "origin")[0]
                if status in _HOLDS_KEY:
                    return status
                if status is not None:  # failed / stopped / canceled: the key is free again
                    caller_job(self._connection, job_id, origin or self.queue_name).delete()
            try:
                queue.enqueue_call(
                    RUN_PAYLOAD, args=(job.payload,), job_id=job_id,
                    **({"unique": True} if deduped and self._unique else {}), **kwargs,
                )
                return None
            except Exception as exc:
                if type(exc).__name__ != "DuplicateJobError":
                    raise
                # Lost a race with another caller for this key: look again.
        raise RuntimeError(f"rq adapter: could not enqueue or attach to job {job_id}")

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        return await asyncio.to_thread(recorded_outcomes, self._connection, list(handles))

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        await asyncio.to_thread(self._cancel, handle, running)

    def _cancel(self, handle: str, running: bool) -> None:
        from rq.exceptions import InvalidJobOperation

        for _ in range(10):
            status, origin = self._fields([handle], "status", "origin")[0]
            if status is None:
                return
            job = caller_job(self._connection, handle, origin or self.queue_name)
            if status in _CANCELLABLE:
                with contextlib.suppress(InvalidJobOperation):
                    job.cancel()
                    # RQ gives a cancelled job's hash no TTL (its canceled registry never
                    # expires): without one, every cancelled run stays in Redis for good.
                    self._connection.expire(job.key, int(self._defaults.get("failure_ttl")
                                                         or CANCELLED_TTL))
                # A worker may have taken the job from the queue just before the cancel
                # (it marks it started right after, over our 'canceled'): if the job is
                # bound to a worker now, stop its work-horse too. A worker that has not
                # bound it yet finds it in the canceled registry (run_payload).
                if self._stop(handle):
                    return
                if self._fields([handle], "status")[0][0] != "started":  # not picked up
                    return
            elif status == "started":
                if not running or self._stop(handle):
                    return
                # started but not yet bound to a worker: look again
            else:
                return  # finished, failed, stopped, canceled: nothing runs
            time.sleep(0.05)

    def _stop(self, handle: str) -> bool:
        """``send_stop_job_command`` with the worker's name read raw (RQ's own fetches
        the job); False when no worker is bound to the job yet."""
        from rq.command import send_command

        worker = self._fields([handle], "worker_name")[0][0]
        if worker:
            send_command(self._connection, worker, "stop-job", job_id=handle)
        return bool(worker)

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """One pipelined ``HMGET`` (and one ``PUBSUB NUMSUB``) for every job asked about.
        A job whose worker refused its payload (``run_payload`` records ``refused``) is
        REFUSED once it ended: the transport fails the run naming the key."""
        texts = await asyncio.to_thread(self._fetch_statuses, list(handles))
        return {
            handle: JobState.GONE if text is None else self.map_state(text)
            for handle, text in zip(handles, texts, strict=True)
        }

    def _fetch_statuses(self, handles: list[str]) -> list[str | None]:
        """Statuses, with one correction: RQ keeps a job ``started`` when its whole worker
        was killed (until its own cleanup, job_timeout later), so a started job whose
        worker is no longer subscribed to its command channel, in two rounds in a row (at
        least ``_ROUND_SECONDS`` apart), reads ``abandoned`` (gone: the orphan policy
        applies)."""
        rows = self._fields(handles, "status", "worker_name", STATE_FIELD)
        workers = {w for status, w, _ in rows if status == "started" and w}
        listening = subscribed(self._connection, sorted(f"rq:pubsub:{w}" for w in workers))
        alive = {w for w in workers if f"rq:pubsub:{w}" in listening}
        now = time.monotonic()
        texts: list[str | None] = []
        for handle, (status, worker, ours) in zip(handles, rows, strict=True):
            if status in _ENDED and ours == RunState.REFUSED.value:
                texts.append(ours)
            elif status == "started" and worker and worker not in alive:
                first = self._worker_gone.setdefault(handle, now)
                texts.append("abandoned" if now - first >= _ROUND_SECONDS else status)
            else:
                self._worker_gone.pop(handle, None)
                texts.append(status)
        return texts

    async def detach(self, handle: str) -> None:
        self._worker_gone.pop(handle, None)

    async def release(self, handle: str) -> None:
        self._worker_gone.pop(handle, None)

    async def worker_hosts(self) -> list[str] | None:
        return await asyncio.to_thread(
            _worker_hosts, self._connection, self._queue(self.queue_name)
        )

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            elapsed = await asyncio.to_thread(_ping_seconds, self._connection)
            rows.append(("redis reachable", True, f"{self.redis_url} ({elapsed * 1000:.1f} ms)"))
        except Exception as exc:  # every failure is a row
            rows.append(("redis reachable", False,
                         f"{self.redis_url}: {exc}; start Redis or set executor_config.redis_url"))
            return rows
        hosts = await self.worker_hosts() or []
        if hosts:
            rows.append((f"rq worker on queue '{self.queue_name}'", True,
                         f"{len(hosts)} worker(s) on {', '.join(sorted(set(hosts)))}"))
        else:
            rows.append((f"rq worker on queue '{self.queue_name}'", False,
                         f"no worker listens; start one: rq worker {self.queue_name} "
                         f"--url {self.redis_url} -w wove_adapters.adapters.rq.Worker"))
        return rows


# ---------------------------------------------------------------- helpers


def _enqueue_options(job: JobSpec, options: dict[str, Any]) -> dict[str, Any]:
    """``Queue.enqueue_call`` keywords from our option names (``_ENQUEUE_OPTIONS``), with
    a description and the meta that name the run when the options do not."""
    kwargs = {rq_name: options[ours] for ours, rq_name in _ENQUEUE_OPTIONS.items()
              if ours in options}
    kwargs.setdefault(
        "description", f"wove {job.task_id} (run {job.run_id}, attempt {job.attempt})"
    )
    kwargs["meta"] = {
        **dict(options.get("meta") or {}),
        "wove_run_id": job.run_id,
        "wove_task_id": job.task_id,
        "wove_attempt": job.attempt,
    }
    return kwargs


# ---------------------------------------------------------------- doctor rows


def _ping_seconds(connection: Any) -> float:
    started = time.perf_counter()
    connection.ping()
    return time.perf_counter() - started


def _worker_hosts(connection: Any, queue: Any) -> list[str]:
    """The hosts of the workers on ``queue`` that still listen (``rq_reads.subscribed``:
    RQ keeps a worker killed with SIGKILL registered for its worker_ttl)."""
    from rq import Worker

    workers = Worker.all(queue=queue)
    listening = subscribed(connection, [w.pubsub_channel_name for w in workers])
    return [str(w.hostname or "?") for w in workers if w.pubsub_channel_name in listening]


def __getattr__(name: str) -> Any:
    """``Worker`` (``rq worker -w wove_adapters.adapters.rq.Worker``) lives in
    ``worker/rq.py`` and is built on first access, so importing this module never
    imports rq."""
    if name == "Worker":
        from wove_adapters.worker import rq as worker_side

        return worker_side.Worker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
