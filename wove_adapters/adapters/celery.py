"""``celery``: each run is one Celery task, ``wove_adapters.run(payload)``, on your workers.

Caller side: ``CeleryAdapter`` sends the signed payload with ``app.send_task`` (from a
small thread pool, never on the event loop) to a Celery app created once per adapter from
``executor_config`` (or your own app, ``app: "pkg.module:app"``). Worker side: one line,
``register(app)``, adds the task to your app so ``celery -A yourapp worker`` runs payloads;
with no app at all, ``celery -A wove_adapters.adapters.celery:worker_app worker`` does.

The Celery task id is the run's idempotency key (sanitised), and the key is claimed in the
Redis result backend (``SET NX``) before sending: Celery itself runs a task id as often as
it is sent, so the claim is what makes "same key, one execution" hold even between callers
that share no ledger. A caller that loses the claim follows the owner's task and answers
from the signed outcome the worker stores as the task's result; a key whose task already
finished answers at once from that stored outcome.

Cancel is ``revoke(terminate=True, signal="SIGTERM")``: workers drop a queued task and
SIGTERM the prefork child running it, where ``wove_adapters.worker.runner`` turns the
signal into ``task_cancelled``. ``status()`` maps the result backend's task state (the
task records STARTED itself, off its critical path). PENDING is also Celery's word for
"unknown" and for "lost": on a Redis broker, ``_PendingCheck`` looks for such a message in
the queue, in the broker's unacked hash and at the workers that answer, and reports a run
no worker will ever start as GONE (see docs/adapters/celery.md, "Runs that never start").
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.claims import KeyClaims
from wove_adapters.adapters.registry import import_object
from wove_adapters.core.errors import redact_url
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState

log = logging.getLogger("wove_adapters.adapters.celery")

T = TypeVar("T")

TASK_NAME = "wove_adapters.run"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_QUEUE = "celery"
# Settings both sides agree on: JSON only (the payload is signed ASCII text; nothing of
# ours needs pickle on the broker).
BASE_CONF: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "broker_connection_retry_on_startup": True,
}
# Celery task ids: we keep keys readable; anything else becomes "-" (plus a digest).
_ID_CHARS = r"A-Za-z0-9_\-.:@"
# send_task keywords that executor_config may set directly (besides ``send_options``).
_SEND_KEYS = ("queue", "routing_key", "exchange", "priority")
_PAYLOAD_REPR = "('<signed wove-adapters payload>',)"
# The claim of a key lives beside its task's result: celery-task-meta-<key>:wove-claim.
_CLAIM_SUFFIX = ":wove-claim"
# A claim whose task ended in one of these never yields an outcome: it may be taken over.
_DEAD_STATES = ("FAILURE", "REVOKED", "REJECTED")
# The caller's app retries a publish for about ten seconds (Celery's default gives up
# after ~1 s): a broker restart then delays submissions instead of failing them.
PUBLISH_RETRY_POLICY: dict[str, Any] = {
    "max_retries": 12, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0,
}


class CeleryOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``celery`` (docs/adapters/celery.md)."""

    broker_url: str = DEFAULT_BROKER
    result_backend: str | None = None  # default: the broker URL if it is Redis
    app: Any = None  # "pkg.module:app", or the Celery app itself
    queue: str = DEFAULT_QUEUE
    # send_task options for every task (_SEND_KEYS), and any others.
    routing_key: str | None = None
    exchange: Any = None  # a name or a kombu Exchange
    priority: int | None = None
    send_options: dict[str, Any] = {}
    task_name: str = TASK_NAME
    celery_config: dict[str, Any] = {}
    idempotency_claim: bool = True
    revoke_signal: str = "SIGTERM"
    client_threads: int = 4
    connect_timeout: float = 10.0
    inspect_timeout: float = 2.0
    pending_check: bool | str = True  # "false", "no", "off", "0" turn it off
    pending_check_timeout: float = 1.0


class CeleryAdapter(BackendAdapter):
    name = "celery"
    config_struct = CeleryOptions
    extra = "celery"
    required_modules = ("celery", "kombu")
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=True,  # prefork pool: the child is SIGTERMed, the task interrupted
        confirm_cancel=True,  # task_cancelled from the worker, or REVOKED in the backend
        native_idempotency=True,  # task id = key, claimed in the Redis result backend
        native_result=False,
        status=True,
        requeue=True,
        detach=True,  # workers outlive the caller and record outcomes in the ledger
        inline_payload_limit=512 * 1024,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "PENDING": JobState.PENDING,  # also "never heard of it"
        "RECEIVED": JobState.PENDING,
        "RETRY": JobState.PENDING,
        "STARTED": JobState.RUNNING,
        "SUCCESS": JobState.SUCCEEDED,
        "FAILURE": JobState.FAILED,
        "REJECTED": JobState.FAILED,
        "REVOKED": JobState.CANCELLED,
    }
    reconcile_seconds: ClassVar[float] = 2.0

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.app: Any = None
        self._own_app = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.task_name = str(config.get("task_name") or TASK_NAME)
        self.queue = str(config.get("queue") or DEFAULT_QUEUE)
        send = {key: config[key] for key in _SEND_KEYS if config.get(key) is not None}
        send.setdefault("queue", self.queue)
        self.send_options: dict[str, Any] = {**send, **dict(config.get("send_options") or {})}
        self.revoke_signal = str(config.get("revoke_signal") or "SIGTERM")
        self.use_claims = bool(config.get("idempotency_claim", True))
        self._claims: KeyClaims | None = None
        self._owned: dict[str, str] = {}  # task id -> run id, for the keys we claimed
        self._pending: _PendingCheck | None = None
        self.capabilities = self._capabilities_for(config)  # type: ignore[misc]

    @classmethod
    def _capabilities_for(cls, config: dict[str, Any]) -> Capabilities:
        """Narrow the claims to this configuration: without a result backend nothing can
        report a job's state (nor confirm a queued task's revoke); claims need one too."""
        broker = str(config.get("broker_url") or DEFAULT_BROKER)
        has_backend = bool(
            config.get("app")
            or config.get("result_backend")
            or (config.get("result_backend") is None
                and broker.startswith(("redis://", "rediss://")))
        )
        return dataclasses.replace(
            cls.capabilities,
            status=has_backend,
            confirm_cancel=has_backend,
            native_idempotency=has_backend and bool(config.get("idempotency_claim", True)),
        )

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=int(self.config.get("client_threads") or 4),
            thread_name_prefix=f"wove-celery-{self.environment}",
        )
        self.app, self._own_app = await self._call(self._make_app)  # may import a module
        await self._call(self._check_connections)
        if self.use_claims:
            await self._open_claims()
        if self._has_backend() and _truthy(self.config.get("pending_check", True)):
            self._pending = _PendingCheck(
                self,
                timeout=float(self.config.get("pending_check_timeout") or 1.0),
                every=float(self.config.get("reconcile_seconds") or self.reconcile_seconds),
            )

    def _make_app(self) -> tuple[Any, bool]:
        spec = self.config.get("app")
        if spec:
            return import_object(str(spec), default="app"), False
        from celery import Celery

        broker = str(self.config.get("broker_url") or DEFAULT_BROKER)
        backend = self.config.get("result_backend")
        if backend is None and broker.startswith(("redis://", "rediss://")):
            backend = broker
        app = Celery(
            f"wove-adapters-{self.environment}",
            broker=broker,
            backend=backend or None,
            set_as_current=False,
        )
        app.conf.update(BASE_CONF)
        app.conf.task_publish_retry_policy = dict(PUBLISH_RETRY_POLICY)
        app.conf.update(dict(self.config.get("celery_config") or {}))
        return app, True

    def _check_connections(self) -> None:
        timeout = float(self.config.get("connect_timeout") or 10.0)
        url = self.app.conf.broker_url
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=3, interval_start=0.2,
                                             interval_step=0.5, timeout=timeout)
        except Exception as exc:
            raise ConnectionError(
                f"Celery broker {redact_url(url)} is unreachable ({exc}). Start it (Redis: "
                f"`redis-server --bind 127.0.0.1`; RabbitMQ: `rabbitmq-server -detached`) or "
                f"fix executor_config.broker_url."
            ) from exc

    async def _open_claims(self) -> None:
        """Claims live in the Redis result backend (any other backend: no claims, the
        dispatcher and the ledger dedupe), through an asyncio client of its own."""
        url = self._backend_redis_url()
        if url is None:
            return
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(url)
        try:
            await client.ping()
        except Exception as exc:
            await client.aclose()
            raise ConnectionError(
                f"Celery result backend {redact_url(url)} is unreachable ({exc}); fix "
                f"executor_config.result_backend."
            ) from exc
        prefix = self.app.backend.task_keyprefix
        prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        self._claims = KeyClaims(client, prefix=prefix, ttl=int(self.app.backend.expires or 86400))

    async def aclose(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending.aclose()
        if self._claims is not None:
            claims, self._claims = self._claims, None
            with contextlib.suppress(Exception):
                await claims.client.aclose()
        if self._pool is not None:
            if self._own_app and self.app is not None:
                with contextlib.suppress(Exception):
                    await self._call(self.app.close)
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Celery/kombu/redis call in this adapter's client threads."""
        assert self._pool is not None, "the celery adapter is not started"
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, functools.partial(fn, *args, **kwargs)
        )

    # ------------------------------------------------------------ the three primitives

    def task_id_for(self, job: JobSpec) -> str:
        """The idempotency key (sanitised) when there is one, else the run and attempt.
        A requeued attempt of a keyed run gets ``~<attempt>``: ``~`` never survives
        sanitising, so it cannot collide with another key."""
        if job.idempotency_key is not None:
            base = self.safe_name(job.idempotency_key, allowed=_ID_CHARS, max_len=200)
            return base if job.attempt == 1 else f"{base}~{job.attempt}"
        return self.safe_name(f"{job.run_id}.{job.attempt}", allowed=_ID_CHARS, max_len=200)

    async def submit(self, job: JobSpec) -> str:
        task_id = self.task_id_for(job)
        claims = self._claims if job.idempotency_key is not None else None
        if claims is not None:
            # The owner's requeued attempt moves the claim to its new task id; a claim
            # whose task ended without an outcome (worker lost, revoked) is taken over.
            holder = await claims.claim(_claim_name(task_id), run_id=job.run_id,
                                        handle=task_id, is_dead=self._is_dead)
            if holder is not None:  # another caller's task holds the key: follow it
                return Following(holder)
        options = {**self.send_options, **job.options}
        try:
            await self._call(self._send, job.payload, task_id, options)
        except BaseException:
            if claims is not None:
                await claims.release(_claim_name(task_id), run_id=job.run_id)
            raise
        if self._pending is not None:
            self._pending.sent(task_id, _queue_of(options))
        if claims is not None:
            self._owned[task_id] = job.run_id
            if len(self._owned) > 10_000:  # only cancel reads it; keep the recent ones
                self._owned.pop(next(iter(self._owned)))
        return task_id

    def _send(self, payload: str, task_id: str, options: dict[str, Any]) -> None:
        # ignore_result: the worker side stores the task's states itself (see
        # ``execute``); Celery also skips its per-task result subscription then.
        # argsrepr: Celery would otherwise saferepr the payload into every message
        # (half the cost of send_task) and show it in logs and monitors.
        from kombu.exceptions import InconsistencyError, OperationalError

        def send() -> None:
            self.app.send_task(
                self.task_name, args=[payload], task_id=task_id, ignore_result=True,
                argsrepr=_PAYLOAD_REPR, kwargsrepr="{}", **options,
            )

        try:
            try:
                send()
            except Exception as exc:
                if not _caused_by(exc, InconsistencyError):
                    raise
                # A Redis broker that restarted empty forgot the queue's binding, and
                # kombu remembers having declared it: declare it again, once.
                self._declare_queue(options)
                send()
        except (OperationalError, OSError) as exc:
            raise ConnectionError(
                f"environment '{self.environment}': the Celery broker "
                f"{redact_url(self.app.conf.broker_url)} did not take task {task_id} after "
                f"retrying ({type(exc).__name__}: {exc}). Start the broker or fix "
                f"executor_config.broker_url; celery_config.task_publish_retry_policy "
                f"sets how long a submission retries."
            ) from exc

    def _declare_queue(self, options: dict[str, Any]) -> None:
        name = _queue_of(options) or self.queue
        queue = self.app.amqp.queues[name]
        with self.app.connection_for_write() as connection:
            queue.bind(connection.default_channel).declare()

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        await self._call(
            self.app.control.revoke, handle, terminate=running, signal=self.revoke_signal
        )
        run_id = self._owned.pop(handle, None)
        if run_id is not None and self._claims is not None:  # a cancelled key may run again
            await self._claims.release(_claim_name(handle), run_id=run_id)

    async def release(self, handle: str) -> None:
        if self._pending is not None:
            self._pending.forget(handle)

    async def status(self, handle: str) -> JobState:
        meta = await self._call(self._meta, handle) if self._has_backend() else {}
        native = str(meta.get("status") or "UNKNOWN")
        state = self.map_state(native)
        if self._pending is not None and native in ("PENDING", "STARTED"):
            reason = self._pending.verdict(handle, native, meta)
            if reason is not None:
                await self._pending.gone(handle, reason)
                return JobState.GONE
        if state in (JobState.RUNNING, JobState.SUCCEEDED) or self._claims is None:
            return state
        # A followed key's owner may have requeued (a new task id took the claim over):
        # the key's run is where its claim is now.
        holder = await self._claims.holder(_claim_name(handle))
        if holder is None or holder == handle:
            return state
        return self.map_state(await self._call(self._state, holder))

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """The signed outcome each followed key's task stored as its result (``execute``),
        read from the task that holds the key's claim now (the owner may have requeued)."""
        holders = {handle: handle for handle in handles}
        if self._claims is not None:
            for handle in handles:
                holders[handle] = await self._claims.holder(_claim_name(handle)) or handle
        metas = await self._call(lambda: {h: self._meta(t) for h, t in holders.items()})
        found: dict[str, bytes | Exception] = {}
        for handle, meta in metas.items():
            result = meta.get("result")
            if meta.get("status") != "SUCCESS":
                continue  # not finished; REVOKED shows as CANCELLED in status()
            blob = result.get("outcome") if isinstance(result, dict) else None
            found[handle] = base64.b64decode(blob) if blob else RuntimeError(
                f"Celery task {holders[handle]} holding this idempotency key finished "
                f"without a recorded outcome (a worker older than this caller?): upgrade "
                f"wove-adapters on the workers, or share a ledger between callers"
            )
        return found

    def _meta(self, task_id: str) -> dict[str, Any]:
        return dict(self.app.backend.get_task_meta(task_id, cache=False))

    def _state(self, task_id: str) -> str:
        if not self._has_backend():
            return "UNKNOWN"
        return str(self._meta(task_id).get("status"))

    async def _is_dead(self, task_id: str) -> bool:
        return await self._call(self._state, task_id) in _DEAD_STATES

    # ------------------------------------------------------------ the result backend

    def _has_backend(self) -> bool:
        from celery.backends.base import DisabledBackend

        return not isinstance(self.app.backend, DisabledBackend)

    def _backend_redis_url(self) -> str | None:
        """The URL of the result backend when it is a Redis server (else None)."""
        if not self._has_backend():
            return None
        from celery.backends.redis import RedisBackend

        backend = self.app.backend
        url = str(getattr(backend, "url", None) or "")
        if not isinstance(backend, RedisBackend) or not url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            return None
        return url

    # ------------------------------------------------------------ doctor

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            await self._call(self._check_connections)
            rows.append(("broker reachable", True, redact_url(self.app.conf.broker_url)))
        except Exception as exc:  # every failure is a row
            rows.append(("broker reachable", False, str(exc)))
            return rows
        if self._has_backend():
            backend = redact_url(self.app.conf.result_backend)
            try:
                if self._claims is not None:
                    await self._claims.client.ping()
                rows.append(("result backend", True, backend))
            except Exception as exc:
                rows.append(("result backend", False, f"{backend}: {exc}; fix "
                             f"executor_config.result_backend"))
        else:
            rows.append(("result backend", False, "none configured: status() cannot see "
                         "jobs; set executor_config.result_backend (e.g. redis://...)"))
        rows.append(await self._worker_row())
        if self.config.get("return_path") == "redis":
            url = str(self.config.get("return_redis_url") or "redis://127.0.0.1:6379/0")
            try:
                await self._call(_redis_ping, url)
                rows.append(("redis return path", True, redact_url(url)))
            except Exception as exc:
                rows.append(("redis return path", False, f"{redact_url(url)}: {exc}"))
        return rows

    async def _worker_row(self) -> tuple[str, bool, str]:
        inspect = self.app.control.inspect(timeout=float(self.config.get("inspect_timeout", 2.0)))
        queues = await self._call(inspect.active_queues) or {}
        listening = sorted(
            worker for worker, items in queues.items()
            if any(item.get("name") == self.queue for item in items or [])
        )
        if not listening:
            return ("worker on queue", False,
                    f"no worker consumes queue '{self.queue}': start one with "
                    f"`celery -A yourapp worker -Q {self.queue}` after "
                    f"`wove_adapters.adapters.celery.register(app)`")
        registered = await self._call(inspect.registered) or {}
        missing = [w for w in listening if self.task_name not in (registered.get(w) or [])]
        if missing:
            return ("worker on queue", False,
                    f"{', '.join(missing)} consume '{self.queue}' but lack the task "
                    f"'{self.task_name}': call wove_adapters.adapters.celery.register(app)")
        return ("worker on queue", True, f"{', '.join(listening)} on '{self.queue}'")


# ---------------------------------------------------------------- runs that never start

# How many consecutive inspections must miss a message before it is called gone: one
# can catch it between two places (popped from the queue, not yet in the unacked hash;
# acked, not yet STARTED); two, at least a reconcile interval apart, cannot.
_MISSES_FOR_GONE = 2
# Runs younger than this are not looked for: they are almost always still queued.
_MIN_AGE = 5.0
# Above this many queued messages the queue is not scanned (its runs stay PENDING).
_SCAN_LIMIT = 20_000
# Tracked submissions (released runs are forgotten; this bounds a caller that never
# releases).
_MAX_TRACKED = 200_000
# Delete a dead worker's unacked copy only if it is still exactly what we saw.
_DISCARD_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclasses.dataclass
class _Snapshot:
    """Where the broker and the workers had our messages, read in pipeline order (queue
    lists, then the unacked hash, then the workers), so a message moving on while we
    read is seen at its next stop rather than missed."""

    seq: int
    started: float  # monotonic, before the first read
    asked: frozenset[str]
    queues: frozenset[str]  # scanned queue names; empty when over the scan limit
    queued: frozenset[str]
    unacked: dict[str, tuple[str, bytes]]  # task id -> (delivery tag, raw hash value)
    held: dict[str, str]  # task id -> the worker reporting it reserved/active/scheduled
    responders: frozenset[str]

    def missing(self, task_id: str, native: str, meta: dict[str, Any],
                queue: str | None) -> str | None:
        """Why no worker will start (or finish) this task, or None if it may."""
        if not self.responders:
            return None  # no worker answers: dead or busy, we cannot tell
        if task_id in self.held:
            return None
        answering = ", ".join(sorted(self.responders))
        if native == "STARTED":
            result = meta.get("result")
            host = result.get("hostname") if isinstance(result, dict) else None
            if host and host in self.responders:
                return (f"is STARTED at {host}, which answers but no longer holds it (the "
                        f"worker was restarted, or its process was killed)")
            return None
        if task_id in self.unacked:
            return (f"is held unacked in the broker by no worker that answers ({answering}): "
                    f"its worker died with the message prefetched, and Redis would "
                    f"redeliver it only after the visibility timeout")
        if queue is None or queue not in self.queues:
            return None  # its queue was not scanned: it may be there
        if task_id in self.queued:
            return None
        return (f"is in no queue, not held unacked and unknown to every worker that "
                f"answers ({answering}): the broker lost it (restarted without "
                f"persistence?) or a worker discarded it (one without the task "
                f"'{TASK_NAME}'?)")


class _PendingCheck:
    """Tells a Celery run the backend will never start from one that is queued.

    PENDING in the result backend means queued, unknown and lost alike. On a Redis
    broker the message is findable: in its queue's lists (priority sub-queues
    included), in kombu's ``unacked`` hash while a worker holds it prefetched, or at a
    live worker (``inspect().query_task``: reserved, active, scheduled). A PENDING
    message in none of these, or held unacked while no answering worker has it, in two
    consecutive snapshots, is GONE; so is a STARTED task whose worker answers without
    it. Nothing is called gone while no worker answers at all (a busy worker looks the
    same as a dead one).

    The dispatcher asks ``status`` once per quiet run per reconcile round: ``verdict``
    only reads the latest snapshot, and a new one is taken in a thread of its own (one
    broadcast and a few Redis reads for all runs; the broadcast waits out its timeout,
    which must not hold a client thread that submissions need), never on the loop. On
    any other broker (RabbitMQ redelivers a dead consumer's unacked messages by itself)
    it never reports anything.
    """

    def __init__(self, adapter: CeleryAdapter, *, timeout: float, every: float) -> None:
        self.adapter = adapter
        self.timeout = timeout
        self.every = max(every, 0.1)
        self.redis: bool | None = None  # decided by the first snapshot
        self._sent: dict[str, tuple[float, str | None]] = {}  # task id -> (at, queue)
        self._asked: dict[str, float] = {}
        self._misses: dict[str, tuple[int, int]] = {}  # task id -> (snapshot seq, count)
        self._gone: dict[str, str] = {}
        self.snapshot: _Snapshot | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._seq = 0
        self._connection: Any = None
        self._channel: Any = None
        self._client: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"wove-celery-pending-{adapter.environment}"
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------ the loop side

    def sent(self, task_id: str, queue: str | None) -> None:
        self._sent[task_id] = (time.monotonic(), queue)
        if len(self._sent) > _MAX_TRACKED:
            self.forget(next(iter(self._sent)))

    def forget(self, task_id: str) -> None:
        for table in (self._sent, self._asked, self._misses, self._gone):
            table.pop(task_id, None)

    def verdict(self, task_id: str, native: str, meta: dict[str, Any]) -> str | None:
        """Why the task will never run (after enough misses), else None. Cheap: reads
        the latest snapshot, and starts the next one when it is due."""
        if self.redis is False:
            return None
        if task_id in self._gone:
            return self._gone[task_id]
        sent = self._sent.get(task_id)
        now = time.monotonic()
        if sent is None or now - sent[0] < _MIN_AGE:
            return None
        self._asked[task_id] = now
        self._maybe_refresh(now)
        snap = self.snapshot
        if snap is None or snap.started <= sent[0] or task_id not in snap.asked:
            return None
        reason = snap.missing(task_id, native, meta, sent[1])
        if reason is None:
            self._misses.pop(task_id, None)
            return None
        seq, count = self._misses.get(task_id, (-1, 0))
        if seq != snap.seq:
            count += 1
            self._misses[task_id] = (snap.seq, count)
        if count < _MISSES_FOR_GONE:
            return None
        self._gone[task_id] = reason
        return reason

    async def gone(self, task_id: str, reason: str) -> None:
        """Say so once, and drop a dead worker's unacked copy: the orphan policy now
        decides (requeue sends a new attempt), and the copy must not run an hour later
        when the visibility timeout would restore it."""
        if self._misses.pop(task_id, None) is None:
            return  # reported already
        log.warning("celery environment '%s': task %s %s; reporting it gone (the run's "
                    "delivery_orphan_policy applies)", self.adapter.environment, task_id,
                    reason)
        snap = self.snapshot
        entry = snap.unacked.get(task_id) if snap is not None else None
        if entry is not None:
            try:
                await self._call(self._discard, *entry)
            except Exception as exc:  # the copy stays; a redelivery is a stale attempt
                log.debug("could not drop the unacked copy of %s: %s", task_id, exc)

    def _maybe_refresh(self, now: float) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        if self.snapshot is not None and now - self.snapshot.started < self.every * 0.5:
            return
        horizon = now - 4 * self.every - 5.0  # ids nobody asked about lately: runs gone
        for task_id in [t for t, at in self._asked.items() if at < horizon]:
            self._asked.pop(task_id, None)
        asked = frozenset(self._asked)
        queues = frozenset(q for t in asked if (q := self._sent.get(t, (0.0, None))[1]))
        self._seq += 1
        self._refresh = asyncio.get_running_loop().create_task(
            self._take_snapshot(self._seq, asked, queues)
        )

    async def _take_snapshot(self, seq: int, asked: frozenset[str],
                             queues: frozenset[str]) -> None:
        try:
            snap = await self._call(self._read, seq, asked, queues)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker down: no verdicts until it answers again
            log.debug("celery pending check: snapshot failed: %s", exc)
            self.snapshot = None
            with contextlib.suppress(Exception):
                await self._call(self._disconnect)
            return
        if snap is not None:
            self.snapshot = snap

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh
        # Not awaited: a snapshot in progress may wait out its broadcast first, and
        # closing must not wait for it. The thread disconnects, then ends.
        with contextlib.suppress(RuntimeError):
            self._thread.submit(self._disconnect)
        self._thread.shutdown(wait=False)

    # ------------------------------------------------------------ the thread side

    def _open(self) -> Any:
        """The broker's kombu Redis channel (None for any other transport)."""
        if self._channel is None:
            connection = self.adapter.app.connection_for_read()
            if getattr(connection.transport, "driver_type", "") != "redis":
                connection.release()
                self.redis = False
                return None
            import redis

            self._connection = connection
            self._channel = connection.default_channel
            # kombu prefixes only the commands it uses; ours get the prefix by hand.
            self._client = redis.Redis(connection_pool=self._channel.pool)
            self.redis = True
        return self._channel

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._client = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def _read(self, seq: int, asked: frozenset[str], queues: frozenset[str]) -> _Snapshot | None:
        started = time.monotonic()
        channel = self._open()
        if channel is None:
            return None
        client = self._client
        prefix = str(getattr(channel, "global_keyprefix", "") or "")
        keys = sorted({prefix + channel._q_for_pri(queue, step)
                       for queue in queues for step in channel.priority_steps})
        queued: set[str] = set()
        scanned: frozenset[str] = frozenset()
        if keys:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                sizes = pipe.execute()
            if sum(int(size) for size in sizes) <= _SCAN_LIMIT:
                with client.pipeline(transaction=True) as pipe:  # one atomic read
                    for key in keys:
                        pipe.lrange(key, 0, -1)
                    for items in pipe.execute():
                        queued.update(filter(None, map(_message_id, items)))
                scanned = queues
        unacked: dict[str, tuple[str, bytes]] = {}
        unacked_key = prefix + str(channel.unacked_key)
        if int(client.hlen(unacked_key)) > _SCAN_LIMIT:
            return None  # cannot tell held from lost: no verdicts
        for tag, raw in client.hgetall(unacked_key).items():
            task_id = _unacked_id(raw)
            if task_id:
                unacked[task_id] = (tag.decode() if isinstance(tag, bytes) else tag, raw)
        wanted = sorted(asked - queued)
        replies = self.adapter.app.control.inspect(timeout=self.timeout).query_task(*wanted)
        held: dict[str, str] = {}
        for worker, found in (replies or {}).items():
            if not isinstance(found, dict) or "error" in found:
                return None  # a worker that cannot say what it holds: no verdicts
            for task_id in found:
                held[str(task_id)] = str(worker)
        return _Snapshot(
            seq=seq, started=started, asked=asked, queues=scanned,
            queued=frozenset(queued), unacked=unacked, held=held,
            responders=frozenset(str(worker) for worker in (replies or {})),
        )

    def _discard(self, tag: str, raw: bytes) -> None:
        channel = self._open()
        if channel is None:
            return
        prefix = str(getattr(channel, "global_keyprefix", "") or "")
        self._client.eval(_DISCARD_SCRIPT, 2, prefix + str(channel.unacked_key),
                          prefix + str(channel.unacked_index_key), tag, raw)


def _message_id(raw: bytes) -> str | None:
    """The task id of a kombu message as the Redis transport stores it (JSON with the
    Celery headers), or None for anything else."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(raw)["headers"]["id"])
    return None


def _unacked_id(raw: bytes) -> str | None:
    """The task id of an entry of kombu's unacked hash: ``[message, exchange, key]``."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError, KeyError):
        return str(json.loads(raw)[0]["headers"]["id"])
    return None


def _claim_name(task_id: str) -> str:
    """The name of the claim of a keyed task id (``~<attempt>`` of a requeue dropped),
    under the result backend's task key prefix."""
    return task_id.split("~", 1)[0] + _CLAIM_SUFFIX


def _queue_of(options: dict[str, Any]) -> str | None:
    """The queue a message goes to, when the send options name it and nothing reroutes
    it (an explicit exchange or routing key may bind it anywhere)."""
    if options.get("exchange") or options.get("routing_key"):
        return None
    queue = options.get("queue")
    if isinstance(queue, str):
        return queue or None
    name = getattr(queue, "name", None)
    return str(name) if name else None


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(value)


def _redis_ping(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    finally:
        client.close()


# ---------------------------------------------------------------- the worker side


def register(
    app: Any,
    *,
    name: str = TASK_NAME,
    acks_late: bool = False,
    reject_on_worker_lost: bool | None = None,
    track_started: bool = True,
    **task_options: Any,
) -> Any:
    """Add the payload task to your Celery app; ``celery -A yourapp worker`` then runs
    wove-adapters payloads. Returns the task.

    ``acks_late`` stays off by default: a worker killed mid-task then loses the message,
    and the caller's ``delivery_orphan_policy`` decides (fail, cancel, requeue, detach).
    With ``acks_late=True, reject_on_worker_lost=True`` Celery redelivers a task whose
    worker died by itself, whatever the caller's policy says (at least once).
    ``track_started`` records STARTED in the result backend (off the task's critical
    path); the task writes its own SUCCESS/REVOKED states, and Celery stores failures
    (worker lost, outcome undeliverable).
    """
    registered: dict[str, Any] = app.__dict__.setdefault("_wove_adapters_tasks", {})
    if name in registered:
        return registered[name]  # registering twice (re-imported module) is a no-op
    # Import the payload runner (cloudpickle, msgspec, aiohttp) in the worker's main
    # process, before the prefork pool forks: every child then starts warm.
    importlib.import_module("wove_adapters.worker.runner")

    def run_payload(task: Any, payload: str) -> dict[str, Any]:
        return execute(task, payload, track_started=track_started)

    options = {
        # Celery would spend two result-backend round trips per state (GET, then SET
        # + PUBLISH); ``execute`` writes each state once. Failures Celery sees itself
        # (WorkerLostError, revoke) are still stored.
        "ignore_result": True,
        "store_errors_even_if_ignored": True,
        **task_options,
    }
    registered[name] = app.task(
        name=name,
        bind=True,
        acks_late=acks_late,
        reject_on_worker_lost=reject_on_worker_lost,
        track_started=False,
        **options,
    )(run_payload)
    return registered[name]


def execute(task: Any, payload: str, *, track_started: bool = True) -> dict[str, Any]:
    """The body of the payload task: run it with the shared worker entrypoint, and make
    the Celery state tell the truth: STARTED while it runs, SUCCESS with a summary (plus,
    for keyed runs, the signed outcome other callers holding the key answer from),
    REVOKED when cancelled, FAILURE when the outcome could not be delivered."""
    from celery import states
    from celery.exceptions import Ignore

    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError
    from wove_adapters.worker import runner as worker

    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        worker.run(payload)  # reports the refusal to the caller where it can
        raise  # and Celery records FAILURE
    # States go through one background thread per child, in order (STARTED before the
    # final one), off the task's critical path. Keyed runs wait for their final state:
    # other callers holding the key answer from it.
    writer = _StateWriter(task)
    if track_started:
        writer.write_soon(states.STARTED, {"pid": os.getpid(),
                                           "hostname": task.request.hostname})
    outcome = worker.run_envelope(envelope)
    summary: dict[str, Any] = {
        "state": outcome.state, "run_id": envelope.run_id, "attempt": envelope.attempt,
    }
    if outcome.state == "cancelled":
        from celery.exceptions import TaskRevokedError

        # REVOKED is one of Celery's exception states: readers decode an exception.
        writer.write_soon(states.REVOKED, TaskRevokedError(f"cancelled: {summary}"))
        raise Ignore()
    if not outcome.delivered:
        writer.flush()  # Celery stores FAILURE next: our STARTED must not land after it
        raise RuntimeError(
            f"the outcome of run {envelope.run_id} could not be delivered to its caller "
            f"({envelope.return_path.kind} {envelope.return_path.url}) nor recorded"
        )
    keyed = envelope.delivery.get("delivery_idempotency_key") is not None
    if keyed:
        signed = outcome.signed()  # JSON results carry text: base64
        summary["outcome"] = base64.b64encode(signed).decode("ascii") if signed else None
    done = writer.write_soon(states.SUCCESS, summary)
    if keyed:
        done.result(timeout=60)
    return summary


class _StateWriter:
    """Writes this task's state to the result backend: one ``SET`` (+ ``PUBLISH``, for
    ``.get()`` waiters) on key-value backends, Celery's ``store_result`` elsewhere.
    ``write_soon`` uses a per-process background thread, off the task's critical path."""

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pid = 0

    def __init__(self, task: Any) -> None:
        self.backend = task.backend
        self.request = task.request
        self.task_id = task.request.id
        self.last: concurrent.futures.Future[None] | None = None

    def write(self, state: str, result: Any) -> None:
        from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend

        backend = self.backend
        if isinstance(backend, DisabledBackend):
            return
        if not isinstance(backend, BaseKeyValueStoreBackend):
            backend.store_result(self.task_id, result, state, request=self.request)
            return
        from celery import states

        if state in states.EXCEPTION_STATES and isinstance(result, BaseException):
            result = backend.prepare_exception(result)
        meta = backend._get_result_meta(result=result, state=state, traceback=None,
                                        request=self.request)
        meta["task_id"] = self.task_id
        backend.set(backend.get_key_for_task(self.task_id), backend.encode(meta))

    def write_soon(self, state: str, result: Any) -> concurrent.futures.Future[None]:
        cls = type(self)
        if cls._pool is None or cls._pid != os.getpid():  # first task of this child
            cls._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wove-celery-state")
            cls._pid = os.getpid()
        self.last = cls._pool.submit(self._write_logged, state, result)
        return self.last

    def _write_logged(self, state: str, result: Any) -> None:
        try:
            self.write(state, result)
        except Exception as exc:  # the state is advisory; the outcome went out already
            log.warning("could not record state %s of task %s: %s", state, self.task_id, exc)
            raise

    def flush(self) -> None:
        """Wait until this task's queued writes have landed (errors are logged)."""
        if self.last is not None:
            with contextlib.suppress(Exception):  # logged by _write_logged
                self.last.result(timeout=30)


def make_worker_app(
    broker_url: str | None = None, result_backend: str | None = None, **conf: Any
) -> Any:
    """A ready Celery app with the payload task, for deployments without one:
    ``celery -A wove_adapters.adapters.celery:worker_app worker -Q QUEUE`` reads
    ``WOVE_CELERY_BROKER_URL``, ``WOVE_CELERY_RESULT_BACKEND`` and
    ``WOVE_CELERY_CONFIG`` (JSON of Celery settings)."""
    from celery import Celery

    broker = broker_url or os.environ.get("WOVE_CELERY_BROKER_URL") or DEFAULT_BROKER
    backend = result_backend or os.environ.get("WOVE_CELERY_RESULT_BACKEND")
    if backend is None and broker.startswith(("redis://", "rediss://")):
        backend = broker
    app = Celery("wove_adapters", broker=broker, backend=backend or None)
    app.conf.update(BASE_CONF)
    app.conf.update(json.loads(os.environ.get("WOVE_CELERY_CONFIG") or "{}"))
    app.conf.update(conf)
    register(app)
    return app


_worker_app: Any = None


def __getattr__(name: str) -> Any:
    """``worker_app`` is built on first access (so importing this module stays cheap)."""
    global _worker_app
    if name == "worker_app":
        if _worker_app is None:
            _worker_app = make_worker_app()
        return _worker_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
