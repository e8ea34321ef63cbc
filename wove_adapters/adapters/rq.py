"""``rq``: every run is one RQ job that calls ``wove_adapters.adapters.rq.run_payload``.

The caller enqueues the signed payload text as the job's only argument; any ``rq worker``
that has ``wove-adapters`` installed runs it (its work-horse verifies, runs, heartbeats and
reports back through the run's return path). Job ids are the sanitised idempotency key
(RQ 2.x and 3.x ids allow only letters, digits, ``_`` and ``-``), so the same key is one RQ
job across callers; a key whose job already finished answers with the signed outcome the
job recorded as its return value. Cancel removes a queued job (``Job.cancel``) or kills a
running one's work-horse (``send_stop_job_command``); RQ then marks the job STOPPED,
which confirms ``require_ack``. ``status_many`` reads every asked job's RQ status in one
pipelined ``HMGET``.

This module never imports ``rq`` or ``redis`` at import time: the worker-side pieces
(``run_payload`` and the preloading ``Worker`` class, reached through ``__getattr__``)
must load in a worker without the caller's configuration, and ``core`` must not depend
on RQ. Every blocking redis/RQ call runs in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState, RunState

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
    extra = "rq"
    required_modules = ("rq", "redis")
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=True,  # send_stop_job_command: the work-horse is SIGKILLed
        confirm_cancel=True,  # RQ marks the job STOPPED / CANCELED: status() confirms
        native_idempotency=True,  # job_id = sanitised idempotency key
        native_result=False,
        status=True,
        requeue=True,
        detach=True,  # RQ workers run on without the caller; outcomes go to the ledger
        inline_payload_limit=1024 * 1024,
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
        "ABANDONED": JobState.GONE,  # ours: started, but its worker is gone (status())
    }
    reconcile_seconds: ClassVar[float] = 1.0
    # RQ's work-horse ends with its job, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "settled"

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.redis_url = str(config.get("redis_url") or DEFAULT_REDIS_URL)
        self.queue_name = str(config.get("queue") or DEFAULT_QUEUE)
        self._defaults = {k: config[k] for k in (*_ENQUEUE_OPTIONS, "meta") if k in config}
        self._connection: Any = None
        self._queues: dict[str, Any] = {}
        self._unique = False
        self._worker_gone: dict[str, float] = {}  # handle -> when its worker was first gone

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)

    def _connect(self) -> None:
        import redis
        from rq import Queue

        options = dict(self.config.get("redis_options") or {})
        self._connection = redis.Redis.from_url(self.redis_url, **options)
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

            queue = self._queues[name] = Queue(name, connection=self._connection)
        return queue

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
        found = await asyncio.to_thread(self._enqueue, job, job_id, options)
        if found is not None:  # another caller's job holds this key: the transport follows
            return Following(job_id)
        return job_id

    def _enqueue(self, job: JobSpec, job_id: str, options: dict[str, Any]) -> str | None:
        """Enqueue unless a job with this id already holds the key; returns that job's
        status when it does, None when we enqueued."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job

        queue = self._queue(str(options.get("queue") or self.queue_name))
        kwargs = {ours: options[ours] for ours in _ENQUEUE_OPTIONS if ours in options}
        kwargs = {_ENQUEUE_OPTIONS[k]: v for k, v in kwargs.items()}
        kwargs.setdefault(
            "description", f"wove {job.task_id} (run {job.run_id}, attempt {job.attempt})"
        )
        kwargs["meta"] = {
            **dict(options.get("meta") or {}),
            "wove_run_id": job.run_id,
            "wove_task_id": job.task_id,
            "wove_attempt": job.attempt,
        }
        deduped = job.idempotency_key is not None
        for _ in range(5):
            if deduped:
                status = _status_text(Job(job_id, connection=self._connection))
                if status in _HOLDS_KEY:
                    return status
                if status is not None:  # failed / stopped / canceled: the key is free again
                    with contextlib.suppress(NoSuchJobError):
                        Job.fetch(job_id, connection=self._connection).delete()
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
        return await asyncio.to_thread(self._recorded_outcomes, list(handles))

    def _recorded_outcomes(self, handles: list[str]) -> dict[str, bytes | Exception]:
        """What each finished job returned: its signed outcome (run_payload)."""
        from rq.job import Job

        found: dict[str, bytes | Exception] = {}
        for handle, job in zip(handles, Job.fetch_many(handles, self._connection), strict=True):
            if job is None or _status_text(job) != "finished":
                continue
            value = job.return_value()
            found[handle] = value if isinstance(value, bytes) else RuntimeError(
                f"rq job {handle} holding this idempotency key finished without a "
                f"recorded outcome (a worker older than this caller?)"
            )
        return found

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        await asyncio.to_thread(self._cancel, handle, running)

    def _cancel(self, handle: str, running: bool) -> None:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job

        for _ in range(10):
            try:
                job = Job.fetch(handle, connection=self._connection)
            except NoSuchJobError:
                return
            status = _status_text(job)
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
                if self._connection.hget(job.key, "worker_name"):
                    with contextlib.suppress(InvalidJobOperation):
                        send_stop_job_command(self._connection, handle)
                    return
                if _status_text(job) != "started":  # not picked up meanwhile: done
                    return
            elif status == "started":
                if not running:
                    return
                try:
                    send_stop_job_command(self._connection, handle)
                    return
                except InvalidJobOperation:
                    pass  # started but not yet bound to a worker: look again
            else:
                return  # finished, failed, stopped, canceled: nothing runs
            time.sleep(0.05)

    async def status(self, handle: str) -> JobState:
        return (await self.status_many([handle]))[handle]

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """One pipelined ``HMGET`` (and one ``PUBSUB NUMSUB``) for every job asked about."""
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
        from rq.job import Job

        pipe = self._connection.pipeline(transaction=False)
        for handle in handles:
            pipe.hmget(Job.key_for(handle), "status", "worker_name")
        rows = [
            (status.decode() if status else None, worker.decode() if worker else None)
            for status, worker in pipe.execute()
        ]
        workers = sorted({w for status, w in rows if status == "started" and w})
        alive: set[str] = set()
        if workers:
            channels = [f"rq:pubsub:{name}" for name in workers]
            counts = dict(self._connection.pubsub_numsub(*channels))
            alive = {
                name
                for name, channel in zip(workers, channels, strict=True)
                if int(counts.get(channel.encode(), 0) or counts.get(channel, 0)) > 0
            }
        now = time.monotonic()
        texts: list[str | None] = []
        for handle, (status, worker) in zip(handles, rows, strict=True):
            if status == "started" and worker and worker not in alive:
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

    # ------------------------------------------------------------ doctor

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            elapsed = await asyncio.to_thread(self._ping)
            rows.append(("redis reachable", True, f"{self.redis_url} ({elapsed * 1000:.1f} ms)"))
        except Exception as exc:  # every failure is a row
            rows.append(("redis reachable", False,
                         f"{self.redis_url}: {exc}; start Redis or set executor_config.redis_url"))
            return rows
        hosts = await asyncio.to_thread(self._worker_hosts)
        if hosts:
            rows.append((f"rq worker on queue '{self.queue_name}'", True,
                         f"{len(hosts)} worker(s) on {', '.join(sorted(set(hosts)))}"))
        else:
            rows.append((f"rq worker on queue '{self.queue_name}'", False,
                         f"no worker listens; start one: rq worker {self.queue_name} "
                         f"--url {self.redis_url} -w wove_adapters.adapters.rq.Worker"))
        rows.append(await self._return_path_row(hosts))
        return rows

    def _ping(self) -> float:
        started = time.perf_counter()
        self._connection.ping()
        return time.perf_counter() - started

    def _worker_hosts(self) -> list[str]:
        from rq import Worker

        workers = Worker.all(queue=self._queue(self.queue_name))
        if not workers:
            return []
        # RQ keeps a worker killed with SIGKILL registered for its worker_ttl (minutes);
        # a live worker is subscribed to its command channel, and Redis drops that
        # subscription the moment the worker's connection dies.
        listening = dict(
            self._connection.pubsub_numsub(*[w.pubsub_channel_name for w in workers])
        )
        return [
            str(w.hostname or "?")
            for w in workers
            if int(
                listening.get(w.pubsub_channel_name.encode(), 0)
                or listening.get(w.pubsub_channel_name, 0)
            )
            > 0
        ]

    async def _return_path_row(self, hosts: list[str]) -> tuple[str, bool, str]:
        if self.config.get("return_path") == "redis":
            import redis

            url = str(self.config.get("return_redis_url") or DEFAULT_REDIS_URL)

            def _ping_dropbox() -> None:
                client = redis.Redis.from_url(url)
                try:
                    client.ping()
                finally:
                    client.close()

            try:
                await asyncio.to_thread(_ping_dropbox)
                return ("return path (redis drop box) reachable", True, url)
            except Exception as exc:
                return ("return path (redis drop box) reachable", False, f"{url}: {exc}")
        from wove_adapters.callbacks.receiver import get_receiver

        receiver = await get_receiver(self.config)
        base = receiver.url.split("/wove/events/")[0]
        try:
            await asyncio.to_thread(_http_get, f"{base}/wove/health")
        except Exception as exc:
            return ("receiver reachable", False, f"{base}: {exc}")
        remote = sorted({h for h in hosts if h != socket.gethostname()})
        loopback = any(part in base for part in ("//127.", "//localhost", "//[::1]"))
        if remote and loopback:
            return ("receiver reachable", False,
                    f"{base} is loopback but workers run on {', '.join(remote)}: set "
                    f"executor_config.callback_host / callback_url, or return_path 'redis'")
        return ("receiver reachable", True, base)


# ---------------------------------------------------------------- helpers


def _status_text(job: Any) -> str | None:
    """The job's RQ status as text, None when RQ no longer knows the job."""
    from rq.exceptions import InvalidJobOperation, NoSuchJobError

    try:
        status = job.get_status(refresh=True)
    except (InvalidJobOperation, NoSuchJobError):
        return None
    if status is None:
        return None
    return str(getattr(status, "value", status))


def _http_get(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as response:
        response.read()


# ---------------------------------------------------------------- the worker side


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

    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        return worker.run(payload).state.value  # reports the refusal where it can
    if _cancelled_before_start():
        outcome = worker.Outcome(RunState.CANCELLED)
        worker.deliver_terminal(
            envelope,
            frames.TaskCancelled(**envelope.outcome_ident, reason="cancelled before it started"),
            outcome,
        )
        outcome.settle(linger=True)
        return outcome.state.value
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
    if envelope.delivery.get("delivery_idempotency_key") is None:
        return outcome.state.value
    # Kept as the job's result for another caller that holds the same key.
    return outcome.signed() or outcome.state.value


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

    Worker.__module__ = __name__
    return Worker


def __getattr__(name: str) -> Any:
    """``Worker`` is built on first access, so importing this module never imports rq."""
    global _worker_class
    if name == "Worker":
        if _worker_class is None:
            _worker_class = _make_worker_class()
        return _worker_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
