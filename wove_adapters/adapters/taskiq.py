"""``taskiq``: payloads travel as a Taskiq task named ``wove_adapters.run``.

Caller side (``TaskiqAdapter``): one broker per adapter (taskiq-redis ``ListQueueBroker``
by default, ``RedisStreamBroker``, or the user's own broker object), the async kicker
(``kiq`` with ``with_task_id``), and a small set of Redis keys under ``key_prefix`` that
give Taskiq what it lacks:

- ``claim:<key>``: the shared key claim (``adapters.claims``) on the sanitised idempotency
  key; a second caller with the same key gets ``Following`` (the transport reads the first
  job's signed ``outcome:<id>`` through ``outcomes``) instead of kicking again.
- ``cancel:<id>`` + a publish on ``cancel``: the worker skips a queued job carrying the
  marker (and reports ``task_cancelled``) and SIGTERMs a running one.
- ``state:<id>`` / ``lease:<id>``: written by the worker; a ``running`` job whose lease
  (``worker.leases``) lapsed belongs to a worker that died (``status_many`` says GONE).

Worker side (``register(broker)``): adds the ``wove_adapters.run`` task to the user's
broker, so ``taskiq worker myapp:broker`` runs payloads. Each payload runs in a process
of its own from the shared warm pool (``wove_adapters.worker.pool``), never on the
worker's event loop, so a sync task cannot stall the worker and a running task can really
be stopped.

Nothing here imports taskiq at module level; ``core`` never imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.claims import KeyClaims
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker import leases
from wove_adapters.worker.pool import PoolRun, ProcessPool, report_to_caller

TASK_NAME = "wove_adapters.run"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "wove_adapters"
_FINAL_STATES = ("succeeded", "failed", "cancelled", "refused", "lost")
# Worker side, atomically: a cancel marker wins (0); a job that already finished, or runs
# elsewhere under a live lease (PTTL at least worker.leases.TAIL_MS), is a redelivery and
# is dropped (2); else it runs here (1), under a lease.
_BEGIN_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('SET', KEYS[2], 'cancelled', 'EX', ARGV[1])
  return 0
end
local state = redis.call('GET', KEYS[2])
if state and (state ~= 'running' or redis.call('PTTL', KEYS[3]) >= tonumber(ARGV[4])) then
  return 2
end
redis.call('SET', KEYS[2], 'running', 'EX', ARGV[1])
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[2])
return 1
"""
_FINISH_SCRIPT = """
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1])
redis.call('DEL', KEYS[2])
if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3], 'EX', ARGV[1]) end
return 1
"""


def workers_key(queue: str) -> str:
    """The sorted set where workers announce themselves (``doctor`` reads it)."""
    return f"wove:taskiq:workers:{queue}"


def _unreachable(url: str, exc: BaseException) -> ConnectionError:
    return ConnectionError(
        f"taskiq: Redis at {url} is unreachable ({type(exc).__name__}: {exc}). Start it "
        "(`redis-server --daemonize yes --bind 127.0.0.1`) or set executor_config['url']."
    )


class TaskiqOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``taskiq`` (docs/adapters/taskiq.md)."""

    url: str = DEFAULT_URL
    queue: str = DEFAULT_QUEUE
    broker: str = "list"  # "list", "stream" or "module:attribute"
    result_url: str | None = None  # default: url
    result_prefix: str | None = None
    control_url: str | None = None  # default: url
    key_prefix: str | None = None  # default: wove:taskiq:<queue>
    labels: dict[str, Any] = {}
    lease_seconds: float = 10.0
    claim_ttl: int = 86400


class TaskiqAdapter(BackendAdapter):
    name = "taskiq"
    config_struct = TaskiqOptions
    extra = "taskiq"
    required_modules = ("taskiq", "taskiq_redis")
    capabilities = Capabilities(
        cancel_queued=True,  # the worker drops a marked job when it dequeues it
        cancel_running=True,  # the payload's child process is SIGTERMed (SIGKILL later)
        confirm_cancel=True,  # the worker reports task_cancelled; status() says CANCELLED
        native_idempotency=True,  # task id = key, plus a Redis SET NX claim
        native_result=False,  # results come back on the return path, not by polling
        status=True,
        requeue=True,
        detach=True,  # the worker is independent of the caller; it reports to the ledger
        heartbeats=True,
        inline_payload_limit=1024 * 1024,
    )
    # Our worker-written states (taskiq itself has none besides "result ready").
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "QUEUED": JobState.PENDING,
        "RUNNING": JobState.RUNNING,
        "SUCCEEDED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "REFUSED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "LOST": JobState.GONE,  # the payload's process died without an outcome
        "LAPSED": JobState.GONE,  # running, but the worker's lease expired: worker died
        "RESULT_OK": JobState.SUCCEEDED,  # only taskiq's result backend knows the job
        "RESULT_ERR": JobState.FAILED,
    }
    reconcile_seconds: ClassVar[float] = 2.0

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.url = str(config.get("url") or DEFAULT_URL)
        self.queue = str(config.get("queue") or DEFAULT_QUEUE)
        self.control_url = str(config.get("control_url") or self.url)
        self.prefix = str(config.get("key_prefix") or f"wove:taskiq:{self.queue}")
        self.lease_seconds = float(config.get("lease_seconds") or 10.0)
        self.claim_ttl = int(config.get("claim_ttl") or 86400)
        self.labels: dict[str, Any] = dict(config.get("labels") or {})
        self._broker: Any = None
        self._redis: Any = None
        self._claims: KeyClaims | None = None

    # ---------------------------------------------------------------- life cycle

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.Redis.from_url(self.control_url)
        try:
            await self._redis.ping()
        except Exception as exc:
            await self._redis.aclose()
            raise _unreachable(self.control_url, exc) from exc
        self._claims = KeyClaims(self._redis, prefix=f"{self.prefix}:claim:", ttl=self.claim_ttl)
        self._broker = self._make_broker()
        await self._broker.startup()

    def _make_broker(self) -> Any:
        from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker

        kind = str(self.config.get("broker") or "list")
        if ":" in kind:  # the user's own broker object (or a factory returning one)
            import importlib

            module, _, attr = kind.partition(":")
            broker = getattr(importlib.import_module(module), attr)
            return broker() if not hasattr(broker, "kick") else broker
        if kind == "list":
            broker = _kicking_list_broker(ListQueueBroker)(self.url, queue_name=self.queue)
        elif kind == "stream":
            broker = RedisStreamBroker(self.url, queue_name=self.queue)
        else:
            raise ValueError(
                f"taskiq executor_config['broker']={kind!r}: use 'list', 'stream' or "
                "'module:attribute' naming your own taskiq broker"
            )
        backend: Any = RedisAsyncResultBackend(
            str(self.config.get("result_url") or self.url),
            prefix_str=self.config.get("result_prefix"),
        )
        return broker.with_result_backend(backend)

    async def aclose(self) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await self._broker.shutdown()
            self._broker = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    def _key(self, kind: str, handle: str) -> str:
        return f"{self.prefix}:{kind}:{handle}"

    # ---------------------------------------------------------------- submit

    async def submit(self, job: JobSpec) -> str:
        from taskiq.kicker import AsyncKicker

        if job.idempotency_key is None:
            handle = f"{job.job_name}-{uuid.uuid4().hex[:10]}"
        else:
            base = self.safe_name(job.idempotency_key)
            handle = base if job.attempt == 1 else f"{base}-a{job.attempt}"
            assert self._claims is not None, "start() first"
            holder = await self._claims.claim(
                base, run_id=job.run_id, handle=handle, is_dead=self._ended_without_outcome
            )
            if holder is not None:  # another caller's job holds this key: the transport follows
                return Following(holder)
            # Ours now: whatever an expired or dead claim's job left under this id is stale.
            result_key = self._result_key(handle)
            await self._redis.delete(
                *(self._key(kind, handle) for kind in ("state", "lease", "cancel", "outcome")),
                *([result_key] if result_key else []),
            )
        control = {
            "url": self.control_url,
            "prefix": self.prefix,
            "handle": handle,
            "lease": self.lease_seconds,
            "ttl": self.claim_ttl,
        }
        labels = {**self.labels, **job.options}
        kicker: Any = AsyncKicker(TASK_NAME, self._broker, labels).with_task_id(handle)
        await kicker.kiq(payload=job.payload, control=control)
        return handle

    async def _ended_without_outcome(self, handle: str) -> bool:
        """Whether the job holding a claim ended without a signed outcome to hand over (lost,
        refused, cancelled before it started, or its worker died): its claim is free."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(self._key("state", handle))
            pipe.exists(self._key("outcome", handle))
            pipe.pttl(self._key("lease", handle))
            state, kept, pttl = await pipe.execute()
        native = state.decode() if state is not None else ""
        if native == "running":
            return not leases.alive(pttl)
        return native in _FINAL_STATES and not kept

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """The signed outcome the worker kept for each finished job (one ``MGET``). A job
        that ended without one is left out: reconciliation reports it."""
        keys = [self._key(kind, h) for kind in ("outcome", "state") for h in handles]
        replies = await self._redis.mget(keys)
        blobs, states = replies[: len(handles)], replies[len(handles) :]
        found: dict[str, bytes | Exception] = {}
        for handle, blob, state in zip(handles, blobs, states, strict=True):
            if blob is not None:
                try:
                    found[handle] = base64.b64decode(blob, validate=True)
                except ValueError as exc:
                    found[handle] = exc
            elif state == b"succeeded":
                found[handle] = RuntimeError(
                    f"the taskiq job {handle} holding this idempotency key succeeded without "
                    f"a recorded outcome"
                )
        return found

    # ---------------------------------------------------------------- cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(self._key("cancel", handle), "1", ex=self.claim_ttl)
            pipe.publish(f"{self.prefix}:cancel", handle)
            await pipe.execute()

    async def status(self, handle: str) -> JobState:
        return (await self.status_many([handle]))[handle]

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """Our worker-written state, else taskiq's result backend: one pipeline for every
        job asked about (when our own result backend shares our Redis, its readiness
        check rides along)."""
        keyed = [(h, self._result_key(h)) for h in handles]
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle, result_key in keyed:
                pipe.get(self._key("state", handle))
                pipe.pttl(self._key("lease", handle))
                pipe.exists(self._key("cancel", handle))
                pipe.exists(result_key or self._key("state", handle))
            replies = await pipe.execute()
        states: dict[str, JobState] = {}
        for i, (handle, result_key) in enumerate(keyed):
            state, pttl, cancelled, result_ready = replies[4 * i : 4 * i + 4]
            states[handle] = await self._state_of(handle, state, pttl, cancelled,
                                                  result_ready or result_key is None)
        return states

    async def _state_of(
        self, handle: str, state: bytes | None, pttl: int, cancelled: int, check_result: bool
    ) -> JobState:
        if state is not None:
            native = state.decode()
            if native == "running" and not leases.alive(pttl):
                native = "lapsed"
            return self.map_state(native)
        if cancelled:
            return JobState.CANCELLED  # never started; the worker drops it on sight
        if check_result:
            backend = self._broker.result_backend
            with contextlib.suppress(Exception):
                if await backend.is_result_ready(handle):
                    result = await backend.get_result(handle)
                    return self.map_state("result_err" if result.is_err else "result_ok")
        return self.map_state("queued")

    def _result_key(self, handle: str) -> str | None:
        """Where our own RedisAsyncResultBackend keeps a result, when it shares our Redis
        (then the readiness check rides in the status pipeline)."""
        if ":" in str(self.config.get("broker") or "list"):
            return None
        if str(self.config.get("result_url") or self.url) != self.control_url:
            return None
        prefix = self.config.get("result_prefix")
        return f"{prefix}:{handle}" if prefix else handle

    # ---------------------------------------------------------------- doctor

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            await self._redis.ping()
            depth = ""
            if str(self.config.get("broker") or "list") == "list":
                depth = f", {await self._redis.llen(self.queue)} message(s) waiting"
            detail = f"{self.url} queue '{self.queue}'{depth}"
            rows.append(("taskiq broker reachable", True, detail))
        except Exception as exc:
            rows.append(("taskiq broker reachable", False, str(_unreachable(self.url, exc))))
            return rows
        seen = await self._redis.zrangebyscore(workers_key(self.queue), time.time() - 15, "+inf")
        rows.append((
            "taskiq worker listening",
            bool(seen),
            f"{len(seen)} worker process(es) on queue '{self.queue}': "
            + ", ".join(s.decode() for s in seen[:5])
            if seen
            else f"no worker announced itself on queue '{self.queue}' in the last 15 s: call "
            "wove_adapters.adapters.taskiq.register(broker) in your broker module and run "
            "`taskiq worker yourmodule:broker`",
        ))
        backend = self._broker.result_backend
        try:
            await backend.is_result_ready("wove-adapters-doctor")
            rows.append(("taskiq result backend reachable", True, type(backend).__name__))
        except Exception as exc:
            rows.append(("taskiq result backend reachable", False, f"{type(exc).__name__}: {exc}"))
        return rows


def _kicking_list_broker(base: Any) -> Any:
    """taskiq-redis builds a ``Redis`` object per kick (about a tenth of a caller's CPU
    in a burst); the caller's broker keeps one over the same pool instead."""

    class _ListQueueBroker(base):
        async def kick(self, message: Any) -> None:
            client = getattr(self, "_wove_client", None)
            if client is None:
                from redis.asyncio import Redis

                client = self._wove_client = Redis(connection_pool=self.connection_pool)
            await client.lpush(message.labels.get("queue_name") or self.queue_name, message.message)

    return _ListQueueBroker


# ==================================================================== the worker side


def register(
    broker: Any,
    *,
    processes: int | None = None,
    kill_after: float = 5.0,
    task_name: str = TASK_NAME,
    announce_queue: str | None = None,
) -> Any:
    """Add the ``wove_adapters.run`` task to a Taskiq broker (one line in your broker
    module); then ``taskiq worker yourmodule:broker`` runs payloads.

    ``processes``: payload processes per worker process (default: CPU count); match it
    with ``--max-async-tasks`` so queued jobs stay in the broker. ``kill_after``: seconds
    a cancelled task gets to stop after SIGTERM before SIGKILL. ``announce_queue``: the
    queue name the worker announces for ``wove-adapters doctor`` (default: the broker's).
    """
    from taskiq import TaskiqEvents

    _no_read_timeout_for_brpop(broker)
    side = _WorkerSide.get()
    side.size = int(processes or os.cpu_count() or 2)
    side.kill_after = kill_after

    async def _startup(state: Any) -> None:
        await side.start(broker, announce_queue)

    async def _shutdown(state: Any) -> None:
        await side.aclose()

    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, _startup)
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, _shutdown)
    return broker.register_task(run_payload, task_name=task_name)


def _no_read_timeout_for_brpop(broker: Any) -> None:
    """redis-py 8 reads with a 5 s socket timeout by default, and taskiq-redis's
    ``ListQueueBroker`` waits in an unbounded BRPOP: an idle worker dies every 5 s and
    takes its running tasks with it (taskiq-redis issue #127). Lift the read timeout on
    that broker's pool, and say so."""
    from taskiq_redis import ListQueueBroker

    pool = getattr(broker, "connection_pool", None)
    if isinstance(broker, ListQueueBroker) and pool is not None:
        kwargs = pool.connection_kwargs
        if "socket_timeout" not in kwargs or kwargs["socket_timeout"] is not None:
            import logging

            logging.getLogger("wove_adapters.taskiq").info(
                "ListQueueBroker: read timeout lifted so BRPOP can wait (taskiq-redis #127); "
                "pass socket_timeout=None to ListQueueBroker to make that explicit",
            )
            kwargs["socket_timeout"] = None
            if "orig_socket_timeout" in kwargs:
                kwargs["orig_socket_timeout"] = None


async def run_payload(payload: str, control: dict[str, Any] | None = None) -> dict[str, Any]:
    """The task body: run one signed payload in a payload process, honouring the
    caller's cancel markers and holding a lease while it runs."""
    return await _WorkerSide.get().run(payload, control)


@dataclass
class _Job:
    handle: str
    payload: str
    cancelled: bool = False
    run: PoolRun | None = None  # set once the job is handed to the payload pool


class _WorkerSide:
    """Per worker process: the payload process pool (``wove_adapters.worker.pool``),
    Redis clients, cancel listeners, leases, and the presence record for ``doctor``."""

    _instance: ClassVar[_WorkerSide | None] = None

    def __init__(self) -> None:
        self.size = os.cpu_count() or 2
        self.kill_after = 5.0
        self._pool: ProcessPool | None = None
        self._redis: dict[str, Any] = {}
        self._listening: dict[tuple[str, str], asyncio.Task[None]] = {}  # subscribed
        self._jobs: dict[tuple[str, str], _Job] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._scripts: dict[str, Any] = {}

    @classmethod
    def get(cls) -> _WorkerSide:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    # ------------------------------------------------------------ life cycle

    @property
    def pool(self) -> ProcessPool:
        if self._pool is None:
            self._pool = ProcessPool(self.size, kill_after=self.kill_after, reuse=True)
        return self._pool

    async def start(self, broker: Any, announce_queue: str | None) -> None:
        self._spawn_bg(self.pool.start())  # warm: the zygote imports while we announce
        queue = announce_queue or getattr(broker, "queue_name", None)
        pool = getattr(broker, "connection_pool", None)
        if queue and pool is not None:
            self._spawn_bg(self._announce(pool, str(queue)))

    async def aclose(self) -> None:
        for task in [*self._background, *self._listening.values()]:
            task.cancel()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        for client in self._redis.values():
            await leases.keeper(client).aclose()
            with contextlib.suppress(Exception):
                await client.aclose()
        self._redis.clear()
        self._listening.clear()

    async def _announce(self, pool: Any, queue: str) -> None:
        from redis.asyncio import Redis

        member = f"{socket.gethostname()}:{os.getpid()}"
        client = Redis(connection_pool=pool)
        try:
            while True:
                with contextlib.suppress(Exception):
                    now = time.time()
                    await client.zadd(workers_key(queue), {member: now})
                    await client.zremrangebyscore(workers_key(queue), "-inf", now - 60)
                    await client.expire(workers_key(queue), 120)
                await asyncio.sleep(5)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(client.zrem(workers_key(queue), member))

    def _spawn_bg(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------ control keys

    async def _client(self, url: str) -> Any:
        client = self._redis.get(url)
        if client is None:
            import redis.asyncio as aioredis

            client = self._redis[url] = aioredis.Redis.from_url(url)
            self._scripts[url] = (
                client.register_script(_BEGIN_SCRIPT), client.register_script(_FINISH_SCRIPT)
            )
        return client

    async def _listen(self, url: str, prefix: str) -> None:
        """Subscribe once per (Redis, prefix) to cancel requests; return when subscribed."""
        entry = self._listening.get((url, prefix))
        if entry is None or (entry.done() and entry.exception() is not None):
            entry = asyncio.get_running_loop().create_task(self._subscribe(url, prefix))
            self._listening[(url, prefix)] = entry
        await asyncio.shield(entry)

    async def _subscribe(self, url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        # Its own client without a read timeout: a quiet channel is not a dead one.
        client = aioredis.Redis.from_url(url, socket_timeout=None, health_check_interval=30)
        pubsub = client.pubsub()
        await pubsub.subscribe(f"{prefix}:cancel")
        self._spawn_bg(self._cancel_loop(url, prefix, client, pubsub))

    async def _cancel_loop(self, url: str, prefix: str, client: Any, pubsub: Any) -> None:
        try:
            while True:
                try:
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._cancel(prefix, message["data"].decode())
                except Exception:
                    await asyncio.sleep(0.5)  # Redis went away: resubscribe, then catch up
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
                    pubsub = client.pubsub()
                    with contextlib.suppress(Exception):
                        await pubsub.subscribe(f"{prefix}:cancel")
                        await self._catch_up(url, prefix)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await client.aclose()

    async def _catch_up(self, url: str, prefix: str) -> None:
        """Cancel requests published while we were not subscribed: read the markers."""
        handles = [h for (p, h) in self._jobs if p == prefix]
        if not handles:
            return
        client = await self._client(url)
        marked = await client.mget([f"{prefix}:cancel:{h}" for h in handles])
        for handle, mark in zip(handles, marked, strict=True):
            if mark is not None:
                self._cancel(prefix, handle)

    def _cancel(self, prefix: str, handle: str) -> None:
        job = self._jobs.get((prefix, handle))
        if job is None or job.cancelled:
            return
        job.cancelled = True
        if job.run is not None:  # waiting: never runs; running: SIGTERM, SIGKILL later
            job.run.cancel()

    # ------------------------------------------------------------ one job

    async def run(self, payload: str, control: dict[str, Any] | None) -> dict[str, Any]:
        if not control:
            job = _Job(handle=uuid.uuid4().hex, payload=payload)
            return await self._notify(job, await self._execute(job))
        url, prefix, handle = str(control["url"]), str(control["prefix"]), str(control["handle"])
        lease, ttl = float(control.get("lease", 10.0)), int(control.get("ttl", 86400))
        key = (prefix, handle)
        job = _Job(handle=handle, payload=payload)
        client = await self._client(url)  # registers the scripts for this Redis
        await self._listen(url, prefix)
        self._jobs[key] = job  # registered before the marker check: no cancel slips by
        try:
            # Atomically: a cancel marker wins, else the job is ours, under a lease, from
            # here on (also while it waits for a payload process: that wait is ours).
            lease_key = f"{prefix}:lease:{handle}"
            keeper = leases.keeper(client)
            began = await self._scripts[url][0](
                keys=[f"{prefix}:cancel:{handle}", f"{prefix}:state:{handle}", lease_key],
                args=[ttl, leases.lease_ms(lease), keeper.owner, leases.TAIL_MS],
            )
            if began == 2:
                return {"state": "duplicate"}  # redelivered (stream brokers): already handled
            if not began:
                await report_to_caller(job.payload, "cancelled", "cancelled before it started")
                return {"state": "cancelled"}
            keeper.hold(lease_key, lease)  # renewed a third into it, and so on
            try:
                report = await self._execute(job)
            finally:
                keeper.release(lease_key)
            await self._scripts[url][1](  # state, outcome and lease in one atomic step
                keys=[f"{prefix}:state:{handle}", f"{prefix}:lease:{handle}",
                      f"{prefix}:outcome:{handle}"],
                args=[ttl, report["state"], report.get("outcome") or ""],
            )
            return await self._notify(job, report)
        finally:
            self._jobs.pop(key, None)

    async def _execute(self, job: _Job) -> dict[str, Any]:
        job.run = run = self.pool.run(job.payload)
        if job.cancelled:
            run.cancel()
        try:
            outcome = await run
        except BaseException:
            run.cancel(signal.SIGKILL)  # our coroutine was cancelled: stop the payload
            raise
        report: dict[str, Any] = {"state": outcome.state, "delivered": outcome.delivered}
        if outcome.outcome is not None:
            report["outcome"] = base64.b64encode(outcome.outcome).decode("ascii")
        if outcome.notice is not None:
            # The payload process did not report (it died, or never started): the caller
            # hears it from us, after the state key says so (see ``run``).
            report["notice"] = outcome.notice
        return report

    @staticmethod
    async def _notify(job: _Job, report: dict[str, Any]) -> dict[str, Any]:
        notice = report.pop("notice", None)
        if notice is not None:
            await report_to_caller(job.payload, report["state"], notice)
        return report
