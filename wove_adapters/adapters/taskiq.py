"""``taskiq``: payloads travel as a Taskiq task named ``wove_adapters.run``.

Caller side (``TaskiqAdapter``): one broker per adapter (taskiq-redis ``ListQueueBroker``
by default, ``RedisStreamBroker``, or the user's own broker object), the async kicker
(``kiq`` with ``with_task_id``), and a small set of Redis keys under ``key_prefix`` that
give Taskiq what it lacks:

- ``claim:<key>``: the shared key claim (``core.claims``) on the sanitised idempotency
  key; a second caller with the same key gets ``Following`` (the transport reads the first
  job's signed ``outcome:<id>`` through ``outcomes``) instead of kicking again.
- ``cancel:<id>`` + a publish on ``cancel``: the worker skips a queued job carrying the
  marker (and reports ``task_cancelled``) and SIGTERMs a running one.
- ``state:<id>`` / ``lease:<id>``: written by the worker; a ``running`` job whose lease
  (``worker.leases``) lapsed belongs to a worker that died (``status_many`` says GONE).
- ``queued:<id>``: written before the kick, dropped by the worker as it begins the job.
  A job with none of these keys is one the broker's Redis lost (a restart without
  persistence, a failover, a flush): GONE, so the orphan policy applies instead of the
  run waiting forever for a message that no longer exists.

Worker side (``register(broker)``, ``wove_adapters.worker.taskiq``, importable from here
too): adds the ``wove_adapters.run`` task to the user's broker, so ``taskiq worker
myapp:broker`` runs payloads, each in a process of its own from the shared warm pool.

Nothing from Redis is unpickled here (taskiq-redis result backends pickle by default:
anyone who can write to Redis would run code in the caller). The caller reads only our
plain keys (``state``, ``lease``, ``cancel``, the JSON claim and the base64 ``outcome``,
which the transport verifies before anything in it is unpickled) and asks a result
backend only whether a result exists, never for the result; its own result backend
uses taskiq's JSON serializer.

Nothing here imports taskiq at module level; ``core`` never imports this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.registry import import_object
from wove_adapters.core.aio import BatchedFetch
from wove_adapters.core.claims import KeyClaims
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker import leases
from wove_adapters.worker.taskiq import TASK_NAME, register, run_payload, workers_key

__all__ = ["TASK_NAME", "TaskiqAdapter", "TaskiqOptions", "register", "run_payload"]

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "wove_adapters"
_FINAL_STATES = ("succeeded", "failed", "cancelled", "refused", "lost")
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
    required_modules = ("taskiq", "taskiq_redis")
    capabilities = Capabilities.backend(
        cancel_queued=True,  # the worker drops a marked job when it dequeues it
        cancel_running=True,  # the payload's child process is SIGTERMed (SIGKILL later)
        confirm_cancel=True,  # the worker reports task_cancelled; status() says CANCELLED
        native_idempotency=True,  # task id = key, plus a Redis SET NX claim
        inline_payload_limit=1024 * 1024,
        chunks=True,
    )
    # Our worker-written states (taskiq itself has none besides "result ready").
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "QUEUED": JobState.PENDING,
        "RUNNING": JobState.RUNNING,
        "SUCCEEDED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "REFUSED": JobState.REFUSED,  # the worker could not verify the payload
        "CANCELLED": JobState.CANCELLED,
        "LOST": JobState.GONE,  # the payload's process died without an outcome
        "LAPSED": JobState.GONE,  # running, but the worker's lease expired: worker died
        # Only taskiq's result backend knows the job: it ended without the state our
        # worker writes before it returns (the result itself is never read).
        "RESULT_READY": JobState.FAILED,
        "MISSING": JobState.GONE,  # no key of ours at all: the broker's Redis lost the job
    }
    reconcile_seconds: ClassVar[float] = 2.0

    options: TaskiqOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.url = self.options.url
        self.queue = self.options.queue
        self.control_url = self.options.control_url or self.url
        self.result_url = self.options.result_url or self.url
        self.prefix = self.options.key_prefix or f"wove:taskiq:{self.queue}"
        self.claim_ttl = self.options.claim_ttl
        self._broker: Any = None
        self._redis: Any = None
        self._claims: KeyClaims | None = None
        # A loop iteration's queued markers go in one pipeline (``_mark_queued``).
        self._queued: BatchedFetch[str, object] = BatchedFetch(
            self._mark_queued, lambda handle: self._mark_queued([handle]))

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

        kind = self.options.broker
        if ":" in kind:  # the user's own broker object (or a factory returning one)
            broker = import_object(kind)
            return broker() if not hasattr(broker, "kick") else broker
        if kind == "list":
            broker = _kicking_list_broker(ListQueueBroker)(self.url, queue_name=self.queue)
            if self.control_url == self.url:  # the markers ride in the kicks' transaction
                broker.wove_marker = self._queued_marker
        elif kind == "stream":
            broker = RedisStreamBroker(self.url, queue_name=self.queue)
        else:
            raise ValueError(
                f"taskiq executor_config['broker']={kind!r}: use 'list', 'stream' or "
                "'module:attribute' naming your own taskiq broker"
            )
        from taskiq.serializers import JSONSerializer

        backend: Any = RedisAsyncResultBackend(
            self.result_url, prefix_str=self.options.result_prefix,
            serializer=JSONSerializer(),  # never pickle (the caller reads no result anyway)
        )
        return broker.with_result_backend(backend)

    async def aclose(self) -> None:
        await self._queued.aclose()
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
            # No takeover of a claim whose job ended badly (no ``is_dead``): the next
            # caller would kick under the same task id while the dead job's message may
            # still wait in the queue. Its followers get the job's end from the transport.
            holder = await self._claims.claim(base, run_id=job.run_id, handle=handle)
            if holder is not None:  # another caller's job holds this key: the transport follows
                return Following(holder)
            # Ours now: whatever an expired claim's job left under this id is stale.
            result_key = self._result_key(handle)
            await self._redis.delete(
                *(self._key(kind, handle) for kind in ("state", "lease", "cancel", "outcome")),
                *([result_key] if result_key else []),
            )
        control = {
            "url": self.control_url,
            "prefix": self.prefix,
            "handle": handle,
            "lease": self.options.lease_seconds,
            "ttl": self.claim_ttl,
        }
        labels = {**self.options.labels, **job.options}
        kicker: Any = AsyncKicker(TASK_NAME, self._broker, labels).with_task_id(handle)
        if getattr(self._broker, "wove_marker", None) is None:
            await self._queued.fetch(handle)  # before the kick: a status never misses both
        await kicker.kiq(payload=job.payload, control=control)
        return handle

    def _queued_marker(self, handle: str) -> tuple[str, int]:
        """(key, seconds to live) of a job's queued marker."""
        return self._key("queued", handle), self.claim_ttl

    async def _mark_queued(self, handles: list[str]) -> list[object]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle in handles:
                key, ttl = self._queued_marker(handle)
                pipe.set(key, "1", ex=ttl)
            await pipe.execute()
        return [None] * len(handles)

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
        """Our worker-written state, else whether taskiq's result backend has a result
        (never the result: it may be a pickle), else whether the job is still queued:
        one pipeline for every job asked about (when our own result backend shares our
        Redis, its readiness check rides along)."""
        keyed = [(h, self._result_key(h)) for h in handles]
        async with self._redis.pipeline(transaction=False) as pipe:
            for handle, result_key in keyed:
                pipe.get(self._key("state", handle))
                pipe.pttl(self._key("lease", handle))
                pipe.exists(self._key("cancel", handle))
                pipe.exists(result_key or self._key("state", handle))
                pipe.exists(self._key("queued", handle))
            replies = await pipe.execute()
        states: dict[str, JobState] = {}
        for i, (handle, result_key) in enumerate(keyed):
            state, pttl, cancelled, result_ready, queued = replies[5 * i : 5 * i + 5]
            states[handle] = await self._state_of(handle, state, pttl, cancelled,
                                                  result_ready or result_key is None, queued)
        return states

    async def _state_of(self, handle: str, state: bytes | None, pttl: int, cancelled: int,
                        check_result: bool, queued: int) -> JobState:
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
                    return self.map_state("result_ready")
        if queued or leases.alive(pttl):  # a live lease: its worker outlived a data loss
            return self.map_state("queued" if queued else "running")
        return self.map_state("missing")

    def _result_key(self, handle: str) -> str | None:
        """Where our own RedisAsyncResultBackend keeps a result, when it shares our Redis
        (then the readiness check rides in the status pipeline)."""
        if ":" in self.options.broker or self.result_url != self.control_url:
            return None
        prefix = self.options.result_prefix
        return f"{prefix}:{handle}" if prefix else handle

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            await self._redis.ping()
            depth = ""
            if self.options.broker == "list":
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
    in a burst); the caller's broker keeps one over the same pool instead, and the kicks
    of one loop turn (a mapped call's runs are submitted together) go as one ``LPUSH``
    per queue: each kick still returns only once Redis has its message, and the messages
    keep their order (a worker's ``BRPOP`` takes them oldest first). With ``wove_marker``
    (task id -> key, ttl), each message's queued marker is set in the same transaction
    as its ``LPUSH``: a Redis that has the message has its marker."""

    class _ListQueueBroker(base):
        _wove_client: Any = None
        _wove_kicks: dict[str, list[tuple[bytes, str, asyncio.Future[None]]]] | None = None
        wove_marker: Callable[[str], tuple[str, int]] | None = None

        async def kick(self, message: Any) -> None:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            queue = message.labels.get("queue_name") or self.queue_name
            if self._wove_kicks is None:
                self._wove_kicks = {}
                loop.call_soon(lambda: loop.create_task(self._wove_push()))
            self._wove_kicks.setdefault(str(queue), []).append(
                (message.message, message.task_id, done))
            await done

        async def _wove_push(self) -> None:
            kicks, self._wove_kicks = self._wove_kicks or {}, None
            try:
                if self._wove_client is None:
                    from redis.asyncio import Redis

                    self._wove_client = Redis(connection_pool=self.connection_pool)
                for queue, items in kicks.items():
                    try:
                        await self._wove_lpush(queue, items)
                    except Exception as exc:  # every kick of the push fails with it
                        for _, _, done in items:
                            if not done.done():
                                done.set_exception(exc)
                        continue
                    for _, _, done in items:
                        if not done.done():
                            done.set_result(None)
            finally:  # cancelled (the loop is closing): no kick waits forever
                for items in kicks.values():
                    for _, _, done in items:
                        if not done.done():
                            done.set_exception(ConnectionError("taskiq kick interrupted"))

        async def _wove_lpush(self, queue: str, items: list[tuple[bytes, str, Any]]) -> None:
            datas = [data for data, _, _ in items]
            if self.wove_marker is None:
                await self._wove_client.lpush(queue, *datas)
                return
            async with self._wove_client.pipeline(transaction=True) as pipe:
                for _, task_id, _ in items:
                    key, ttl = self.wove_marker(task_id)
                    pipe.set(key, "1", ex=ttl)
                pipe.lpush(queue, *datas)
                await pipe.execute()

    return _ListQueueBroker
