"""``celery``: each run is one Celery task, ``wove_adapters.run(payload)``, on your workers.

Caller side (this module): ``CeleryAdapter`` sends the signed payload with
``app.send_task`` (from a small thread pool, never on the event loop) to a Celery app
created once per adapter from ``executor_config`` (or your own app, ``app:
"pkg.module:app"``). Worker side (``worker/celery.py``, re-exported here): one line,
``register(app)``, adds the task to your app so ``celery -A yourapp worker`` runs payloads;
with no app at all, ``celery -A wove_adapters.adapters.celery:worker_app worker`` does.

The Celery task id is the run's idempotency key (sanitised), and the key is claimed in the
Redis result backend (``core.claims``) before sending: Celery itself runs a task id as
often as it is sent, so the claim is what makes "same key, one execution" hold even
between callers that share no ledger. A caller that loses the claim follows the owner's
task (``Following``; the transport does the following) and answers from the signed
outcome the worker stores as the task's result (``outcomes``); a key whose task already
finished answers at once from that stored outcome.

Cancel is ``revoke(terminate=True, signal="SIGTERM")``: workers drop a queued task and
SIGTERM the prefork child running it, where ``wove_adapters.worker.runner`` turns the
signal into ``task_cancelled``. ``status()`` maps the result backend's task state (the
task records STARTED itself, off its critical path). PENDING is also Celery's word for
"unknown" and for "lost": on a Redis broker, ``PendingCheck`` (``celery_pending.py``)
looks for such a message in the queue, in the broker's unacked hash and at the workers
that answer, and reports a run no worker will ever start as GONE (see
docs/adapters/celery.md, "Runs that never start").

Importing this module never imports celery or kombu.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.celery_pending import PendingCheck
from wove_adapters.adapters.celery_reads import (
    check_backend,
    json_control,
    read_meta,
    refused,
)
from wove_adapters.adapters.registry import import_object
from wove_adapters.core.aio import ThreadHops
from wove_adapters.core.claims import KeyClaims
from wove_adapters.core.errors import redact_url
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker.celery import (
    BASE_CONF,
    DEFAULT_BROKER,
    TASK_NAME,
    execute,
    make_worker_app,
    register,
)

__all__ = [  # the worker side's names too: docs and deployments import them from here
    "BASE_CONF", "DEFAULT_BROKER", "DEFAULT_QUEUE", "PUBLISH_RETRY_POLICY", "TASK_NAME",
    "CeleryAdapter", "CeleryOptions", "execute", "make_worker_app", "register",
]

T = TypeVar("T")

DEFAULT_QUEUE = "celery"
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
    required_modules = ("celery", "kombu")
    capabilities = Capabilities.backend(
        cancel_running=True,  # prefork pool: the child is SIGTERMed, the task interrupted
        confirm_cancel=True,  # task_cancelled from the worker, or REVOKED in the backend
        native_idempotency=True,  # task id = key, claimed in the Redis result backend
        inline_payload_limit=512 * 1024,
        chunks=True,
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
        "REFUSED": JobState.REFUSED,  # ours: FAILURE with the worker's PayloadError
    }
    reconcile_seconds: ClassVar[float] = 2.0

    options: CeleryOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.app: Any = None
        self.control: Any = None  # json_control(app): inspect replies are JSON only
        self._own_app = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._hops: ThreadHops | None = None  # submits of one loop iteration, together
        self.task_name = self.options.task_name
        self.queue = self.options.queue
        send = {key: config[key] for key in _SEND_KEYS if config.get(key) is not None}
        send.setdefault("queue", self.queue)
        self.send_options: dict[str, Any] = {**send, **self.options.send_options}
        self._claims: KeyClaims | None = None
        self._owned: dict[str, str] = {}  # task id -> run id, for the keys we claimed
        self._pending: PendingCheck | None = None
        self.capabilities = self._capabilities_for(self.options)  # type: ignore[misc]

    @classmethod
    def _capabilities_for(cls, options: CeleryOptions) -> Capabilities:
        """Narrow the claims to this configuration: without a result backend nothing can
        report a job's state (nor confirm a queued task's revoke); claims need one too."""
        has_backend = bool(
            options.app or options.result_backend
            or (options.result_backend is None
                and options.broker_url.startswith(("redis://", "rediss://")))
        )
        return dataclasses.replace(
            cls.capabilities,
            status=has_backend,
            confirm_cancel=has_backend,
            native_idempotency=has_backend and options.idempotency_claim,
        )

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        threads = self.options.client_threads
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"wove-celery-{self.environment}",
        )
        self._hops = ThreadHops(self._pool, threads)
        # May import a module (the user's app).
        self.app, self._own_app = await self._call(client_app, self.options, self.environment)
        if self._has_backend():  # nothing the caller reads back may be unpickled
            check_backend(self.app.backend)
        self.control = json_control(self.app)
        await self._call(check_broker, self.app, self.options.connect_timeout)
        if self.options.idempotency_claim and self._has_backend():
            self._claims = await open_claims(self.app.backend)
        # What the app really has: a user's app may keep its results anywhere.
        self.capabilities = dataclasses.replace(  # type: ignore[misc]
            self.capabilities, native_idempotency=self._claims is not None
        )
        if self._has_backend() and _truthy(self.options.pending_check):
            self._pending = PendingCheck(
                self,
                timeout=self.options.pending_check_timeout,
                every=self.options.reconcile_seconds or self.reconcile_seconds,
            )

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
            assert self._hops is not None, "the celery adapter is not started"
            await self._hops.call(send_payload, self.app, self.task_name, job.payload, task_id,
                                  options, default_queue=self.queue,
                                  environment=self.environment)
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

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        await self._call(
            self.app.control.revoke, handle, terminate=running, signal=self.options.revoke_signal
        )
        run_id = self._owned.pop(handle, None)
        if run_id is not None and self._claims is not None:  # a cancelled key may run again
            await self._claims.release(_claim_name(handle), run_id=run_id)

    async def release(self, handle: str) -> None:
        if self._pending is not None:
            self._pending.forget(handle)

    async def status(self, handle: str) -> JobState:
        meta = await self._call(self._meta, handle) if self._has_backend() else {}
        native = "REFUSED" if refused(meta) else str(meta.get("status") or "UNKNOWN")
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

    # ------------------------------------------------------------ the result backend

    def _has_backend(self) -> bool:
        from celery.backends.base import DisabledBackend

        return not isinstance(self.app.backend, DisabledBackend)

    def _meta(self, task_id: str) -> dict[str, Any]:
        return read_meta(self.app.backend, task_id)  # never unpickled (celery_reads)

    def _state(self, task_id: str) -> str:
        if not self._has_backend():
            return "UNKNOWN"
        return str(self._meta(task_id).get("status"))

    async def _is_dead(self, task_id: str) -> bool:
        return await self._call(self._state, task_id) in _DEAD_STATES

    async def doctor(self) -> list[tuple[str, bool, str]]:
        rows: list[tuple[str, bool, str]] = []
        try:
            await self._call(check_broker, self.app, self.options.connect_timeout)
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
        rows.append(await self._call(worker_row, self.app, self.queue, self.task_name,
                                     self.options.inspect_timeout))
        return rows


# ---------------------------------------------------------------- the caller's Celery app
# Blocking calls: the adapter runs them in its client threads.


def client_app(options: CeleryOptions, environment: str) -> tuple[Any, bool]:
    """The app the caller sends through: the user's (``app``), or one of ours built from
    ``executor_config`` (True: ours, to close)."""
    if options.app:
        if not isinstance(options.app, str):
            return options.app, False
        return import_object(options.app, default="app"), False
    from celery import Celery

    broker = options.broker_url
    backend = options.result_backend
    if backend is None and broker.startswith(("redis://", "rediss://")):
        backend = broker
    app = Celery(
        f"wove-adapters-{environment}",
        broker=broker,
        backend=backend or None,
        set_as_current=False,
    )
    app.conf.update(BASE_CONF)
    app.conf.task_publish_retry_policy = dict(PUBLISH_RETRY_POLICY)
    app.conf.update(options.celery_config)
    return app, True


def check_broker(app: Any, timeout: float) -> None:
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=3, interval_start=0.2,
                                         interval_step=0.5, timeout=timeout)
    except Exception as exc:
        raise ConnectionError(
            f"Celery broker {redact_url(url)} is unreachable ({exc}). Start it (Redis: "
            f"`redis-server --bind 127.0.0.1`; RabbitMQ: `rabbitmq-server -detached`) or "
            f"fix executor_config.broker_url."
        ) from exc


def send_payload(app: Any, task_name: str, payload: str, task_id: str,
                 options: dict[str, Any], *, default_queue: str, environment: str) -> None:
    # ignore_result: the worker side stores the task's states itself (see
    # ``execute``); Celery also skips its per-task result subscription then.
    # argsrepr: Celery would otherwise saferepr the payload into every message
    # (half the cost of send_task) and show it in logs and monitors.
    from kombu.exceptions import InconsistencyError, OperationalError

    def send() -> None:
        app.send_task(
            task_name, args=[payload], task_id=task_id, ignore_result=True,
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
            queue = app.amqp.queues[_queue_of(options) or default_queue]
            with app.connection_for_write() as connection:
                queue.bind(connection.default_channel).declare()
            send()
    except (OperationalError, OSError) as exc:
        raise ConnectionError(
            f"environment '{environment}': the Celery broker "
            f"{redact_url(app.conf.broker_url)} did not take task {task_id} after "
            f"retrying ({type(exc).__name__}: {exc}). Start the broker or fix "
            f"executor_config.broker_url; celery_config.task_publish_retry_policy "
            f"sets how long a submission retries."
        ) from exc


def worker_row(app: Any, queue: str, task_name: str, timeout: float) -> tuple[str, bool, str]:
    """The doctor's row: a worker consumes the queue and has the payload task."""
    inspect = json_control(app).inspect(timeout=timeout)
    queues = inspect.active_queues() or {}
    listening = sorted(
        worker for worker, items in queues.items()
        if any(item.get("name") == queue for item in items or [])
    )
    if not listening:
        return ("worker on queue", False,
                f"no worker consumes queue '{queue}': start one with "
                f"`celery -A yourapp worker -Q {queue}` after "
                f"`wove_adapters.adapters.celery.register(app)`")
    registered = inspect.registered() or {}
    missing = [w for w in listening if task_name not in (registered.get(w) or [])]
    if missing:
        return ("worker on queue", False,
                f"{', '.join(missing)} consume '{queue}' but lack the task "
                f"'{task_name}': call wove_adapters.adapters.celery.register(app)")
    return ("worker on queue", True, f"{', '.join(listening)} on '{queue}'")


# ---------------------------------------------------------------- claims


async def open_claims(backend: Any) -> KeyClaims | None:
    """The key claims, in the result backend when it is a Redis server (any other
    backend: None, and the dispatcher and the ledger dedupe), through an asyncio client
    of their own, under the backend's task key prefix."""
    from celery.backends.redis import RedisBackend

    url = str(getattr(backend, "url", None) or "")
    if not isinstance(backend, RedisBackend) or not url.startswith(
        ("redis://", "rediss://", "unix://")
    ):
        return None
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
    prefix = backend.task_keyprefix
    prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
    return KeyClaims(client, prefix=prefix, ttl=int(backend.expires or 86400))


def _claim_name(task_id: str) -> str:
    """The name of the claim of a keyed task id (``~<attempt>`` of a requeue dropped),
    under the result backend's task key prefix."""
    return task_id.split("~", 1)[0] + _CLAIM_SUFFIX


# ---------------------------------------------------------------- helpers


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


def __getattr__(name: str) -> Any:
    """``worker_app`` (``celery -A wove_adapters.adapters.celery:worker_app worker``) is
    the worker side's, built on first access."""
    if name == "worker_app":
        from wove_adapters.worker import celery as celery_worker

        return celery_worker.worker_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
