"""The Taskiq worker side of the ``taskiq`` adapter: ``register(broker)`` adds the
``wove_adapters.run`` task to a user's broker (importable from
``wove_adapters.adapters.taskiq`` too), so ``taskiq worker myapp:broker`` runs payloads.

Each payload runs in a process of its own from the shared warm pool
(``wove_adapters.worker.pool``), never on the worker's event loop, so a sync task cannot
stall the worker and a running task can really be stopped. Around it the worker keeps
the adapter's small Redis keys (Taskiq has no job states, dedupe or cancellation of its
own): it honours ``cancel:<id>`` markers and the ``cancel`` channel, writes
``state:<id>`` and, for keyed runs, the signed ``outcome:<id>`` the payload kept
(``worker.pool.run_payload``; nothing here builds or signs an event), and holds
``lease:<id>`` (``worker.leases``) while the job is its own.

Nothing here imports taskiq at module level, and it never imports the caller's side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import os
import signal
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

from wove_adapters.core.aio import retrying
from wove_adapters.core.errors import redact_url
from wove_adapters.worker import leases
from wove_adapters.worker.pool import (
    PoolRun,
    ProcessPool,
    acknowledged,
    late_writes,
    report_to_caller,
)

TASK_NAME = "wove_adapters.run"
# Worker side, atomically: the caller's queued marker goes (the state key speaks from
# here on); a cancel marker wins (0); a job that already finished, or runs elsewhere
# under a live lease (PTTL at least worker.leases.TAIL_MS), is a redelivery and is
# dropped (2); else it runs here (1), under a lease.
_BEGIN_SCRIPT = """
redis.call('DEL', KEYS[4])
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


# How long a worker that took a job keeps trying to begin it while its Redis is away.
BEGIN_RETRY_SECONDS = 60.0


async def _begin(begin: Any, client: Any, lease_key: str, owner: str, *, keys: list[str],
                 args: list[Any]) -> int:
    """The begin script, tried again while Redis does not answer: the job is out of the
    queue and in no Redis yet, so giving up loses it (its caller would see it queued
    for good). A retry answered "duplicate" under this process's own lease means the
    first try did take effect and only its reply was lost: the job is ours."""
    import redis.exceptions

    tries = 0

    async def once() -> int:
        nonlocal tries
        tries += 1
        return int(await begin(keys=keys, args=args))

    began = await retrying(
        once, errors=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError),
        budget=BEGIN_RETRY_SECONDS, delay=0.2, cap=2.0,
    )
    if began == 2 and tries > 1 and await client.get(lease_key) in (owner, owner.encode()):
        return 1
    return began


def workers_key(queue: str) -> str:
    """The sorted set where workers announce themselves (``doctor`` reads it)."""
    return f"wove:taskiq:workers:{queue}"


def register(
    broker: Any,
    *,
    processes: int | None = None,
    kill_after: float = 5.0,
    task_name: str = TASK_NAME,
    announce_queue: str | None = None,
    control_url: str | None = None,
) -> Any:
    """Add the ``wove_adapters.run`` task to a Taskiq broker (one line in your broker
    module); then ``taskiq worker yourmodule:broker`` runs payloads.

    ``processes``: payload processes per worker process (default: CPU count); match it
    with ``--max-async-tasks`` so queued jobs stay in the broker. ``kill_after``: seconds
    a cancelled task gets to stop after SIGTERM before SIGKILL. ``announce_queue``: the
    queue name the worker announces for ``wove-adapters doctor`` (default: the broker's).
    ``control_url``: the Redis the callers' cancel markers, states and leases live in
    (the adapter's ``control_url``; default: the broker's own Redis, or
    ``$WOVE_TASKIQ_CONTROL_URL``). A message naming any other Redis is run without its
    control keys: the address rides unsigned beside the payload, and a queue writer must
    not point workers at a server of its choosing.
    """
    from taskiq import TaskiqEvents
    from taskiq_redis import ListQueueBroker

    _no_read_timeout_for_brpop(broker)
    side = _WorkerSide.get()
    # A list broker never delivers a job twice: nobody reads an acknowledged run's final
    # state but reconciliation, which asks only about runs it has not heard from.
    side.late_finish = isinstance(broker, ListQueueBroker)
    side.size = int(processes or os.cpu_count() or 2)
    side.kill_after = kill_after
    control_url = control_url or os.environ.get("WOVE_TASKIQ_CONTROL_URL")
    if control_url:
        side.allowed = _redis_place(control_url)

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
    acknowledged: bool = False  # its caller took its outcome; nobody else asks (pool)


log = logging.getLogger("wove_adapters.taskiq")


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


def _place_of(kwargs: dict[str, Any]) -> tuple[Any, ...]:
    host = str(kwargs.get("host", "localhost"))
    return ("loopback" if host in _LOOPBACK else host, int(kwargs.get("port", 6379) or 6379),
            int(kwargs.get("db", 0) or 0), kwargs.get("path"))


@functools.lru_cache(maxsize=64)
def _redis_place(url: str) -> tuple[Any, ...] | None:
    """Where a Redis URL points (None: not a Redis URL), to compare two spellings. Every
    job's message names its control Redis: parsed once per spelling, not once per job."""
    from redis.connection import parse_url

    try:
        return _place_of(parse_url(url))
    except (ValueError, TypeError):
        return None


class _WorkerSide:
    """Per worker process: the payload process pool (``wove_adapters.worker.pool``),
    Redis clients, cancel listeners, leases, and the presence record for ``doctor``."""

    _instance: ClassVar[_WorkerSide | None] = None

    def __init__(self) -> None:
        self.size = os.cpu_count() or 2
        self.kill_after = 5.0
        # Final states of acknowledged runs go in batches (pool.LateWrites): only where
        # no job is delivered twice (a redelivered job is dropped by its final state).
        self.late_finish = False
        # The one Redis (host, port, db, unix path) control keys may live in: see register.
        self.allowed: tuple[Any, ...] | None = None
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
        if self.allowed is None and pool is not None:
            kwargs = getattr(pool, "connection_kwargs", {})
            self.allowed = _place_of(kwargs)
        if queue and pool is not None:
            self._spawn_bg(self._announce(pool, str(queue)))

    async def aclose(self) -> None:
        for task in [*self._background, *self._listening.values()]:
            task.cancel()
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
        for client in self._redis.values():
            await late_writes(client).aclose()
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
        if control and self.allowed is not None and (
            _redis_place(str(control.get("url", ""))) != self.allowed
        ):
            log.warning(
                "wove-adapters taskiq worker: a message names control Redis %s, not this "
                "worker's %s: its control keys are ignored (pass register(control_url=...) "
                "if the callers' control_url differs from the broker)",
                redact_url(control.get("url")), self.allowed,
            )
            control = None
        if not control:
            job = _Job(handle=uuid.uuid4().hex, payload=payload)
            return await self._notify(job, await self._execute(job))
        url, prefix, handle = str(control["url"]), str(control["prefix"]), str(control["handle"])
        lease, ttl = float(control.get("lease", 10.0)), int(control.get("ttl", 86400))
        key = (prefix, handle)
        job = _Job(handle=handle, payload=payload)
        client = await self._client(url)
        begin, finish = self._scripts[url]
        await self._listen(url, prefix)
        self._jobs[key] = job  # registered before the marker check: no cancel slips by
        try:
            # Atomically: a cancel marker wins, else the job is ours, under a lease, from
            # here on (also while it waits for a payload process: that wait is ours).
            lease_key = f"{prefix}:lease:{handle}"
            keeper = leases.keeper(client)
            began = await _begin(begin, client, lease_key, keeper.owner, keys=[
                f"{prefix}:cancel:{handle}", f"{prefix}:state:{handle}", lease_key,
                f"{prefix}:queued:{handle}",
            ], args=[ttl, leases.lease_ms(lease), keeper.owner, leases.TAIL_MS])
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
            # State, outcome and lease in one atomic step; for a run whose caller took its
            # outcome, with the other such runs' (nobody waits for it).
            keys = [f"{prefix}:state:{handle}", lease_key, f"{prefix}:outcome:{handle}"]
            args = [ttl, report["state"], report.get("outcome") or ""]
            if self.late_finish and job.acknowledged:
                late_writes(client).add("EVAL", _FINISH_SCRIPT, 3, *keys, *args)
            else:
                await finish(keys=keys, args=args)
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
        job.acknowledged = acknowledged(outcome.report)
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
