"""The dispatcher: one per environment configuration per process, owner of every policy.

Transports only move attempts; this module decides what a run's life looks like:
idempotency (one run per key, in process and, through the ledger, across processes),
in-flight caps, delivery timeouts, heartbeat lapses, reconciliation against the backend's
own view, the orphan policies (fail / cancel / requeue / detach), both cancel modes, and
"exactly one terminal event per run as the caller sees it". Everything runs on the shared
loop (``core.loop``); nothing here blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wove_adapters.core import frames, observe, signing
from wove_adapters.core.chunking import ChunkGatherer
from wove_adapters.core.codec import decode_outcome, frame_to_wire, sign_events
from wove_adapters.core.controls import Controls
from wove_adapters.core.errors import (
    BackendUnavailableError,
    CancelNotAcknowledgedError,
    DeliveryDetachedError,
    DeliveryOrphanedError,
    DeliveryTimeoutError,
    redact_url,
)
from wove_adapters.core.ledger.base import (
    CANCELLED,
    DETACHED,
    FAILED,
    LOST,
    RUNNING,
    SUCCEEDED,
    Ledger,
    LedgerWrite,
    RunRecord,
    SetOutcome,
    Update,
)
from wove_adapters.core.options import shared_default
from wove_adapters.core.policies import DeliveryPolicy, JobState, check_supported
from wove_adapters.core.retry import retry_allowed
from wove_adapters.core.tasklogs import TaskLogs
from wove_adapters.core.transport import RunAttempt, StartContext, Transport

log = logging.getLogger("wove_adapters.runtime")

Listener = Callable[[dict[str, Any]], None]
# State changes and outcomes wait at most this long for company in one ledger commit.
_WRITE_WINDOW = 0.01
# How long shutdown waits for a run's launch (or a background step) to finish.
_LAUNCH_BOUND = 30.0
# The caller's own loop counts as stalled (SIGSTOP, a GC pause, a blocking call) when a
# sleep of ``s`` seconds ends more than ``max(_STALL_MIN, s)`` late.
_STALL_MIN = 1.0
# After a stall no verdict for stall_grace_seconds (core.options, default 7): a worker
# whose post timed out while we were stopped retries after its backoff (worker.sender: at
# most 5 s between tries), and its event must land before its silence counts.
# Before calling a run lost, let the loop read what is already in sockets and pipes.
_SETTLE = 0.2
# A run that has not started is reported after pending_warning_seconds (then 2x, 4x, ...)
# when no delivery_max_pending_seconds applies.
# At most this many runs are named per warning round; the rest are counted.
_WARN_LINES = 5
# How long a status() call of the watcher may take.
_STATUS_BOUND = 10.0
# A cancelled run's in-flight slot is held until the backend says the job stopped, at
# most cancel_release_seconds.
_STATE_OF_EVENT = {
    frames.TASK_RESULT: SUCCEEDED,
    frames.TASK_ERROR: FAILED,
    frames.TASK_CANCELLED: CANCELLED,
}


class Flag:
    """``asyncio.Event``'s ``is_set``/``set``/``wait`` for the flags every run carries
    (``Run.done``, the Hub's "accepted"), without the Event's waiter deque (about 600
    bytes a run, for a flag nearly nobody waits on): a future is made only when someone
    waits, and each waiter is shielded, so one giving up never cancels the others."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> bool:
        if not self._set:
            if self._waiter is None:
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)
        return True


@dataclass
class Run:
    attempt: RunAttempt
    listeners: list[tuple[str, Listener]] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    # When the current attempt reached the backend; moved on by the caller's own stalls.
    pending_since: float = field(default_factory=time.monotonic)
    # Any event of the current attempt arrived (task_started may be dropped by a worker
    # that could not reach us; a heartbeat says the same).
    heard: bool = False
    # A verdict on this run is being reached (or its orphan policy applied) right now.
    judging: bool = False
    orphaning: bool = False
    # Pending runs: the age of the next warning, and when to ask the backend again.
    pending_warn_at: float = 0.0
    pending_check_at: float = 0.0
    started: bool = False
    launched: bool = False
    done: Flag = field(default_factory=Flag)
    terminal: dict[str, Any] | None = None
    cancel_requested: bool = False
    timer: asyncio.TimerHandle | None = None
    # Done once the launch is over (handed over, failed, or the run ended first): the
    # launch's task, or for a run that joins a chunk straight away, its chunk's future.
    launch_task: asyncio.Future[Any] | None = None
    semaphore: asyncio.Semaphore | None = None
    holds_slot: bool = False
    finishing: bool = False
    # The ledger claim queued for this run; the job is launched only once it is committed,
    # so a worker can always record the outcome of a run id the caller handed out.
    claimed: asyncio.Future[Any] | None = None
    # Being handed to the backend right now: from here a cancel must go to the backend.
    submitting: bool = False
    # Resolved for the caller (cancelled) while its job may still run: the slot is kept
    # until the backend confirms the stop, or until this timer gives up.
    stop_timer: asyncio.TimerHandle | None = None
    # Holds task-control leases (a concurrency slot, a registration): released with its
    # in-flight slot, once the job is known to have stopped.
    controlled: bool = False

    @property
    def run_id(self) -> str:
        return self.attempt.run_id


# ---------------------------------------------------------------- the dispatcher


# Where an executor's backend lives: the executor_config keys adapters read (first set
# one wins), and the key each built-in adapter uses when none is set.
_ADDRESS_KEYS = (
    "broker_url", "redis_url", "url", "address", "scheduler_address", "scheduler_file",
    "endpoint_url", "host",
)
_DEFAULT_ADDRESS_KEY = {
    "celery": "broker_url", "rq": "redis_url", "arq": "redis_url", "taskiq": "url",
    "dask": "address", "ray": "address", "temporal": "address", "kubernetes_jobs": "host",
    "aws_batch": "endpoint_url",
}
_BACKEND_NOUNS = {
    "broker_url": "the broker", "redis_url": "Redis", "url": "the broker",
    "address": "the server", "scheduler_address": "the scheduler",
    "scheduler_file": "the scheduler", "endpoint_url": "the service", "host": "the API server",
}
# Exception type names (anywhere in the class hierarchy) that mean "could not reach it",
# for backend libraries whose errors do not derive from OSError (redis-py, kombu, grpc).
_UNREACHABLE_NAMES = frozenset({
    "ConnectionError", "OperationalError", "TimeoutError", "BrokerConnectionError",
    "ConnectionRefusedError", "ConnectionClosed", "ConnectionClosedError",
    "AMQPConnectionError", "ServiceUnavailable", "ClientConnectorError", "CommClosedError",
    "EndpointConnectionError", "MaxRetryError", "NewConnectionError", "BusyLoadingError",
})


def _unreachable(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the backend could not be
    reached, as opposed to refusing what was sent."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        if isinstance(current, (ConnectionError, TimeoutError, socket.gaierror)):
            return True
        if any(cls.__name__ in _UNREACHABLE_NAMES for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def _backend_address(
    transport: Transport, executor_config: dict[str, Any]
) -> tuple[str | None, str | None]:
    """The executor_config key that says where the backend is, and its value (password
    redacted). Unset: the adapter's own key, and the address it resolved if it says."""
    for key in _ADDRESS_KEYS:
        value = executor_config.get(key)
        if isinstance(value, str) and value:
            return key, redact_url(value)
    default_key = _DEFAULT_ADDRESS_KEY.get(transport.name)
    if default_key is None:
        return None, None
    value = getattr(getattr(transport, "adapter", None), default_key, None)
    return default_key, redact_url(value) if isinstance(value, str) and value else None


def _config_seconds(environment: str, executor_config: dict[str, Any], key: str) -> float:
    """A positive number of seconds from ``executor_config`` (else the key's default in
    core.options); a bad value fails at start-up, naming the key."""
    value = executor_config.get(key)
    if value is None:
        return float(shared_default(key))
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = -1.0
    if isinstance(value, bool) or not number > 0:
        raise ValueError(
            f"Environment '{environment}': executor_config.{key} must be a number of "
            f"seconds greater than 0 (got {value!r})"
        )
    return number


def _urgent(op: LedgerWrite | None) -> bool:
    """A write that must not wait for company: a keyed claim (its run waits for it) or
    a flush marker."""
    return op is None or (isinstance(op, RunRecord) and op.idempotency_key is not None)


_RECORD_FIELDS = frozenset(RunRecord.__struct_fields__)
Queued = tuple[LedgerWrite, "asyncio.Future[Any]"]


def _fold(writes: list[Queued]) -> tuple[list[Queued], dict[int, list[tuple[object, Any]]]]:
    """A batch's writes with each later state change and outcome of a run whose unkeyed
    record is still queued in it folded into that record's insert: one statement where
    there were three. Returns the writes left and, by the id of each record's future,
    the (result, future) of the writes folded into it."""
    records: dict[str, RunRecord] = {}
    owners: dict[str, asyncio.Future[Any]] = {}
    left: list[Queued] = []
    folded: dict[int, list[tuple[object, Any]]] = {}
    for op, done in writes:
        record = records.get(op.run_id) if not isinstance(op, RunRecord) else None
        if (isinstance(op, Update) and record is not None
                and _RECORD_FIELDS.issuperset(op.fields)):
            for name, value in op.fields.items():
                setattr(record, name, value)
            # Stamped as the write itself would be (check_update): a run's updated_at
            # says when it last changed, even when its insert carries the change.
            if "updated_at" not in op.fields:
                record.updated_at = time.time()
            folded.setdefault(id(owners[op.run_id]), []).append((None, done))
            continue
        if isinstance(op, SetOutcome) and record is not None and record.outcome is None:
            record.state, record.outcome = op.state, op.outcome
            record.updated_at = time.time()
            folded.setdefault(id(owners[op.run_id]), []).append((True, done))
            continue
        if isinstance(op, RunRecord) and op.idempotency_key is None:
            records[op.run_id], owners[op.run_id] = op, done
        left.append((op, done))
    return left, folded


def _alive(run: Run) -> bool:
    return not run.done.is_set()


def _fail(done: asyncio.Future[Any], exc: BaseException, url: str) -> None:
    log.warning("ledger write failed (%s): %r", url, exc)
    if not done.done():
        done.set_exception(exc)
        done.exception()  # retrieved: the caller may not look


class Dispatcher:
    """Runs for one environment configuration, over one transport."""

    def __init__(
        self,
        *,
        environment: str,
        transport: Transport,
        executor_config: dict[str, Any],
        settings: dict[str, Any],
        ledger: Ledger,
        key_id: str,
    ) -> None:
        self.environment = environment
        self.transport = transport
        self.executor_config = executor_config
        self.settings = settings
        self.ledger = ledger
        self.key_id = key_id
        self.runs: dict[str, Run] = {}
        self.by_key: dict[str, Run] = {}
        self.detached: dict[str, Run] = {}
        # Cancelled runs whose job has not been seen to stop: they keep their slot.
        self.stopping: dict[str, Run] = {}
        self.stats: dict[str, int] = {
            "submitted": 0,
            "duplicate_terminal_dropped": 0,
            "stale_attempt_dropped": 0,
            "requeued": 0,
            "lost": 0,
            "dedup_attached": 0,
        }
        self._semaphores: dict[int, asyncio.Semaphore] = {}
        self._task_logs: TaskLogs | None = None  # made by the first worker record
        self._monitor: asyncio.Task[None] | None = None
        self._ledger_queue: asyncio.Queue[
            tuple[LedgerWrite | None, asyncio.Future[Any]] | None
        ] = asyncio.Queue()
        self._ledger_stopping = False
        self._ledger_task: asyncio.Task[None] | None = None
        self._reconcile_every = float(executor_config.get("reconcile_seconds", 2.0))
        self._stall_grace = _config_seconds(
            environment, executor_config, "stall_grace_seconds"
        )
        self._pending_warning = _config_seconds(
            environment, executor_config, "pending_warning_seconds"
        )
        self._cancel_release = _config_seconds(
            environment, executor_config, "cancel_release_seconds"
        )
        self.stats["released_unconfirmed"] = 0
        # No verdict before this (monotonic) time: the caller itself stalled just before.
        self._quiet_until = 0.0
        self.stats["caller_stalls"] = 0
        self._background: set[asyncio.Task[Any]] = set()
        self.controls = Controls(ledger, app_id=settings.get("app_id"))
        self._chunks = ChunkGatherer(transport, self._spawn)
        self._releasing: list[RunAttempt] = []  # ended this loop iteration

    # ---------------------------------------------------------- life cycle

    async def start(self) -> None:
        await self.transport.start(
            StartContext(self.environment, self.executor_config, self.settings, self._on_event)
        )
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        self._ledger_task = asyncio.get_running_loop().create_task(self._ledger_writer())

    def check_policy(self, policy: DeliveryPolicy) -> None:
        check_supported(
            policy,
            self.transport.capabilities,
            environment=self.environment,
            executor=self.transport.name,
        )

    async def stop(self) -> None:
        """Orphan policies for what is still in flight, then every queued ledger write,
        then the transport. Every background task is awaited or cancelled here."""
        self._chunks.close()
        await self.abandon(list(self.runs), reason="the executor stopped with runs in flight")
        for run in list(self.stopping.values()):
            self._stopped(run)  # the transport's aclose ends what is still running
        if self._monitor is not None:
            self._monitor.cancel()
            await asyncio.gather(self._monitor, return_exceptions=True)
        self._release_batch()  # ended just now: released before the transport closes
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=_LAUNCH_BOUND)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        drain = getattr(self.transport, "drain", None)
        if drain is not None:  # work that must end with this process ends, then its writes
            with contextlib.suppress(Exception):
                await drain()
        await self.controls.aclose()
        await self._stop_ledger_writer()
        await self.transport.aclose()

    # ---------------------------------------------------------- submit

    def submit_now(self, attempt: RunAttempt, listener: Listener) -> Run | None:
        """``submit`` without suspending, for a run that waits for nothing before it is
        accepted (no idempotency key, no cache, no registration or reroute control): its
        record is queued, not awaited. None when the run needs ``submit``. Front ends
        call this first so a plain run costs no task of its own to be accepted."""
        controls = attempt.policy.controls
        if (
            attempt.idempotency_key is not None
            or controls.cache
            or controls.registration != "unlimited"
            or controls.reroute
        ):
            return None
        self.check_policy(attempt.policy)
        return self._accept(attempt, listener, self._ledger_later(self._record(attempt)))

    async def submit(self, attempt: RunAttempt, listener: Listener) -> Run:
        """Accept a run. Returns at once; events reach ``listener`` (with this run's id)."""
        run = self.submit_now(attempt, listener)
        if run is not None:
            return run
        self.check_policy(attempt.policy)
        controls = attempt.policy.controls
        if attempt.idempotency_key is not None:
            attempt.idempotency_key = self.controls.app_key(attempt.idempotency_key)
        elif controls.cache:
            attempt.idempotency_key = self.controls.cache_key(
                attempt.task_id, self._arguments(attempt), controls
            )
        if controls.registration != "unlimited" or controls.reroute:
            holder = await self.controls.admit(
                attempt.run_id, attempt.task_id, self._arguments(attempt), controls
            )
            if holder is not None:
                return await self._attach_to(holder.run_id, attempt, listener)
        try:
            found, claimed = await self._claim(attempt, listener)
        except BaseException:
            self.controls.release(attempt.run_id)  # the registration taken above
            raise
        if found is not None:
            self.controls.release(attempt.run_id)
            return found
        return self._accept(attempt, listener, claimed)

    def _accept(
        self, attempt: RunAttempt, listener: Listener, claimed: asyncio.Future[Any] | None
    ) -> Run:
        """The run is this dispatcher's from here: recorded in memory, timed, launched."""
        controls = attempt.policy.controls
        run = Run(attempt=attempt, listeners=[(attempt.run_id, listener)])
        run.controlled = controls.registration != "unlimited"  # its registration lease
        run.claimed = claimed
        key = attempt.idempotency_key
        self.runs[attempt.run_id] = run
        if key is not None:
            self.by_key[key] = run
        self.stats["submitted"] += 1
        if observe.observers:
            self._observed(observe.run_submitted, run)
        if attempt.policy.timeout:
            # The coroutine is built only when the timer fires: a run that finishes in time
            # must not leave a never-awaited coroutine behind.
            run.timer = asyncio.get_running_loop().call_later(
                attempt.policy.timeout, lambda: self._spawn(self._on_timeout(run))
            )
        chunk = attempt.extra.get("chunk")
        if (
            chunk is not None
            and self.transport.supports_chunks
            and controls.concurrency == "unlimited"
            and not attempt.policy.max_in_flight
        ):
            # No gate to wait at: it joins its chunk now, with no launch task of its own.
            del attempt.extra["chunk"]
            self._begin_launch(run)
            sent = self._chunks.enqueue(attempt, chunk, functools.partial(_alive, run))
            sent.add_done_callback(functools.partial(self._chunk_sent, run))
            run.launch_task = sent
        else:
            run.launch_task = self._spawn(self._launch(run))
        return run

    def _begin_launch(self, run: Run) -> None:
        """The run passed its gates and is being handed over from now."""
        run.submitted_at = run.last_seen = run.pending_since = time.monotonic()
        run.submitting = True
        if observe.observers:  # before the payload is built: it carries the trace
            self._observed(observe.attempt_launched, run)

    def _chunk_sent(self, run: Run, sent: asyncio.Future[bool]) -> None:
        """The end of a launch that went by its chunk's future (see ``_accept``)."""
        if sent.cancelled():
            return
        error = sent.exception()
        if error is None and sent.result():
            self._launched(run)
        elif error is None:
            self._release_slot(run)  # ended while its chunk gathered
        elif isinstance(error, Exception):
            self._launch_failed(run, error)

    async def _claim(
        self, attempt: RunAttempt, listener: Listener
    ) -> tuple[Run | None, asyncio.Future[Any] | None]:
        """A keyed run is claimed now: (the run it attaches to, None) when another holds
        the key, else (None, None). Without a key the claim is queued: (None, its write)."""
        key = attempt.idempotency_key
        if key is None:
            return None, self._ledger_later(self._record(attempt))
        existing = self.by_key.get(key)
        if existing is not None and not existing.done.is_set():
            await self._check_cached_arguments(attempt, key, existing.run_id)
            self.stats["dedup_attached"] += 1
            self._attach(existing, attempt.run_id, listener)
            return existing, None
        record = await self.ledger.claim(self._record(attempt))
        if record.run_id != attempt.run_id:
            await self._check_cached_arguments(attempt, key, record.run_id)
            self.stats["dedup_attached"] += 1
            return await self._follow_ledger(record, attempt, listener), None
        controls = attempt.policy.controls
        if controls.cache and controls.raise_on_diff:
            self._spawn(self.controls.remember_arguments(
                key, attempt.run_id, self._arguments(attempt), controls
            ))
        return None, None

    @staticmethod
    def _arguments(attempt: RunAttempt) -> dict[str, Any]:
        """The call's arguments by name (positional ones too), which task controls key on."""
        named = attempt.extra.get("named_args")
        return dict(named) if isinstance(named, dict) else dict(attempt.args)

    async def _check_cached_arguments(self, attempt: RunAttempt, key: str, owner: str) -> None:
        controls = attempt.policy.controls
        if controls.cache and controls.raise_on_diff:
            await self.controls.check_cached(
                key, owner, attempt.run_id, attempt.task_id, self._arguments(attempt), controls
            )

    async def _attach_to(self, holder: str, attempt: RunAttempt, listener: Listener) -> Run:
        """This call answers with another run's outcome (registration concurrency,
        reroute): that run in this process, or through the ledger from any process."""
        local = self.runs.get(holder)
        if local is not None and not local.done.is_set():
            self._attach(local, attempt.run_id, listener)
            return local
        deadline = time.monotonic() + max(attempt.policy.controls.lease_seconds, 1.0)
        record = await self.ledger.get(holder)
        while record is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # its claim is being written
            record = await self.ledger.get(holder)
        if record is None:
            record = RunRecord(run_id=holder, environment=self.environment, state=LOST)
        return await self._follow_ledger(record, attempt, listener, bind_key=False)

    def _record(self, attempt: RunAttempt) -> RunRecord:
        return RunRecord(
            run_id=attempt.run_id,
            environment=self.environment,
            task_id=attempt.task_id,
            adapter=self.transport.name,
            idempotency_key=attempt.idempotency_key,
            attempt=attempt.attempt,
        )

    def _attach(self, run: Run, run_id: str, listener: Listener) -> None:
        run.listeners.append((run_id, listener))
        if run.started:
            listener(
                frames.event(frames.TASK_STARTED, run_id, run.attempt.task_id, run.attempt.attempt)
            )

    async def _follow_ledger(
        self, record: RunRecord, attempt: RunAttempt, listener: Listener, *,
        bind_key: bool = True,
    ) -> Run:
        """Another process (or an earlier run) owns this key: answer from the ledger.
        ``bind_key=False``: attached by a task control, not by key; the outcome is still
        bound to that run and this task."""
        run = Run(attempt=attempt, listeners=[(attempt.run_id, listener)])
        run.launched = True

        async def _wait() -> None:
            owner = record
            if owner.outcome is None:
                timeout = attempt.policy.timeout
                found = await self.ledger.wait_outcome(record.run_id, timeout=timeout, poll=0.05)
                if found is None:
                    self._finish(
                        run,
                        frames.error_event(
                            attempt.run_id,
                            attempt.task_id,
                            DeliveryTimeoutError(
                                f"run {record.run_id} holding key {attempt.idempotency_key!r} "
                                f"gave no outcome within {timeout}s"
                            ),
                        ),
                        record_outcome=False,
                    )
                    return
                owner = found
            if owner.outcome is None:  # ended without a recorded event (lost, cancelled)
                error = DeliveryOrphanedError(
                    f"run {owner.run_id} holding key {attempt.idempotency_key!r} ended "
                    f"{owner.state} without a recorded outcome", run_id=attempt.run_id)
                self._finish(run, frames.error_event(attempt.run_id, attempt.task_id, error),
                             record_outcome=False)
                return
            try:
                # Bound to this environment's key and to the key and task asked for: a
                # ledger writer cannot point the key at another run's outcome.
                bound: dict[str, Any] = (
                    {"idempotency_key": attempt.idempotency_key} if bind_key else {}
                )
                frame = await asyncio.to_thread(functools.partial(
                    decode_outcome, owner.outcome, owner.run_id, key_id=self.key_id,
                    task_id=attempt.task_id, **bound,
                ))
            except Exception as exc:
                frame = frames.error_event(attempt.run_id, attempt.task_id, exc, source="ledger")
            self._finish(run, frame, record_outcome=False)

        self._spawn(_wait())
        return run

    async def _launch(self, run: Run) -> None:
        cap = run.attempt.policy.max_in_flight
        controls = run.attempt.policy.controls
        try:
            if controls.concurrency != "unlimited":
                taken = await self.controls.take_slot(
                    run.run_id, run.attempt.task_id, self._arguments(run.attempt), controls,
                    run.done.is_set,
                )
                run.controlled = True  # what it holds now goes back with its slot
                if not taken or run.done.is_set():  # ended (cancelled, timed out) meanwhile
                    self._release_slot(run)
                    return
            if cap:
                semaphore = self._semaphores.get(cap)
                if semaphore is None:
                    semaphore = self._semaphores[cap] = asyncio.Semaphore(cap)
                await semaphore.acquire()
                run.semaphore, run.holds_slot = semaphore, True
                if run.done.is_set():
                    self._release_slot(run)
                    return
            if run.done.is_set():  # ended (cancelled, timed out) while it waited for a slot
                self._release_slot(run)
                return
            self._begin_launch(run)
            # Only a first attempt travels in its chunk: a retry or requeue goes alone.
            chunk = run.attempt.extra.pop("chunk", None)
            if chunk is not None and self.transport.supports_chunks:
                alive = functools.partial(_alive, run)
                if not await self._chunks.submit(run.attempt, chunk, alive):
                    self._release_slot(run)  # ended while its chunk gathered
                    return
            else:
                await self.transport.submit(run.attempt)
            self._launched(run)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._launch_failed(run, exc)

    def _launched(self, run: Run) -> None:
        """The backend holds the job: its record and handle are written."""
        run.launched = True
        if run.claimed is not None:
            # Its record is written while the job is handed over, not before: the
            # round trip to the ledger is off the run's critical path. The promise
            # holds: the returned run id is fetchable once the record lands, and a
            # worker whose caller is gone creates the record with the outcome. A
            # record that cannot be written stops the job (the run fails with why).
            # Watched by a callback naming the run by id: nothing here keeps the
            # run (and its result, once it has one) alive until the write lands.
            run.claimed.add_done_callback(functools.partial(self._written, run.run_id))
        if run.attempt.submission:
            # Closures name the run by id only: a queued write must not keep the
            # task's callable (and what it references) alive.
            sub, rid = run.attempt.submission, run.run_id
            self._ledger_later(Update(rid, {"submission": sub}))

    def _launch_failed(self, run: Run, exc: Exception) -> None:
        self._finish(
            run,
            frames.error_event(
                run.run_id,
                run.attempt.task_id,
                self._submit_error(run, exc),
                attempt=run.attempt.attempt,
                source="transport",
                retryable=True,
            ),
        )

    def _written(self, run_id: str, done: asyncio.Future[Any]) -> None:
        """A run's record reached the ledger, or could not: then its job is cancelled
        and the run fails naming why (if it has not ended already)."""
        if done.cancelled() or done.exception() is None:
            return
        error = done.exception()
        run = self.runs.get(run_id)
        if run is None or run.done.is_set():
            log.warning("the ledger record of run %s was not written: %s", run_id, error)
            return
        self._spawn(self._unrecorded(run, error))  # type: ignore[arg-type]

    async def _unrecorded(self, run: Run, error: Exception) -> None:
        with contextlib.suppress(Exception):
            await self.transport.cancel(run.attempt, mode="best_effort")
        self._finish(run, frames.error_event(
            run.run_id, run.attempt.task_id, self._submit_error(run, error),
            attempt=run.attempt.attempt, source="transport", retryable=True,
        ))

    def _submit_error(self, run: Run, exc: Exception) -> BaseException:
        """An error at the boundary names the environment, the executor, the address and
        the setting to fix. A backend that cannot be reached becomes
        ``BackendUnavailableError`` (the library's error as its cause, its text kept);
        any other error keeps its type and gets a note saying where it happened."""
        where = f"environment '{self.environment}' ({self.transport.name})"
        if not _unreachable(exc):
            add_note = getattr(exc, "add_note", None)  # Python 3.11+
            notes = getattr(exc, "__notes__", None) or []
            # One error may end a whole batch of runs: one note, not one per run.
            if add_note is not None and not any(str(n).startswith(where) for n in notes):
                add_note(f"{where}: raised while submitting run {run.run_id}")
            return exc
        key, address = _backend_address(self.transport, self.executor_config)
        noun = _BACKEND_NOUNS.get(key or "", "the backend")
        text = f"{type(exc).__name__}: {exc}"
        if f"environment '{self.environment}'" in str(exc) and "executor_config." in str(exc):
            message = str(exc)  # the adapter already said where and what to fix
        elif key is None:
            message = f"{where}: could not submit to {noun}: {text}; check that it is running"
        else:
            at = address if address is not None else "its default address"
            unset = "" if key in self.executor_config else " (not set: the default applied)"
            message = (
                f"{where}: could not submit to {noun} at {at}: {text}; check "
                f"executor_config.{key}{unset} and that {noun} is running"
            )
        error = BackendUnavailableError(
            message,
            environment=self.environment,
            executor=self.transport.name,
            address=address,
            setting=f"executor_config.{key}" if key else None,
        )
        error.__cause__ = exc
        return error

    # ---------------------------------------------------------- events

    def _on_event(self, frame: dict[str, Any]) -> None:
        run_id = frame.get("run_id", "")
        run = self.runs.get(run_id)
        if run is None:
            detached = self.detached.get(run_id)
            if detached is not None and frame.get("type") in frames.TERMINAL_EVENTS:
                self.detached.pop(run_id, None)
                self._store_outcome(detached, frame)
            stopping = self.stopping.get(run_id)
            if (
                stopping is not None
                and frame.get("attempt", 1) == stopping.attempt.attempt
                and frame.get("type") in (*frames.TERMINAL_EVENTS, frames.TASK_LOST)
            ):
                # The caller already has its ending; this only says the job stopped.
                self._stopped(stopping)
            return
        if frame.get("attempt", 1) != run.attempt.attempt:
            self.stats["stale_attempt_dropped"] += 1
            return
        kind = frame.get("type")
        run.last_seen = time.monotonic()
        run.heard = True
        if kind == frames.TASK_STARTED:
            if not run.started:
                run.started = True
                self._ledger_later(Update(run_id, {"state": RUNNING}))
                if observe.observers:
                    self._observed(observe.attempt_started, run)
            self._broadcast(run, frame)
        elif kind == frames.LOG:
            if "pid" in frame:  # a record of the task's own, from its worker
                self._task_log(run, frame)
            self._broadcast(run, frame)
        elif kind == frames.HEARTBEAT:
            self._broadcast(run, frame)
        elif kind == frames.TASK_LOST:
            self._spawn(self._orphan(run, str(frame.get("reason") or "the backend lost the run")))
        elif kind == frames.TASK_CANCELLED and run.orphaning:
            # The confirmation of the cancel the orphan policy itself sent: the policy's
            # own ending (requeue, DeliveryOrphanedError, ...) is what the caller gets.
            self.stats["stale_attempt_dropped"] += 1
        elif kind in frames.TERMINAL_EVENTS:
            if not self._retry_in_place(run, frame):
                self._finish(run, frame)
        else:
            log.warning("dropping unknown event type %r for run %s", kind, run_id)

    def _task_log(self, run: Run, frame: dict[str, Any]) -> None:
        """Emit a worker's record in this process under ``wove_adapters.task``, within
        the run's cap (``core.tasklogs``; made on the first record, so a dispatcher whose
        runs send none pays nothing)."""
        sink = self._task_logs
        if sink is None:
            config = self.executor_config
            sink = self._task_logs = TaskLogs(
                self.environment,
                int(config.get("task_logs_max_records")
                    or shared_default("task_logs_max_records")),
                int(config.get("task_logs_max_bytes") or shared_default("task_logs_max_bytes")),
                self.stats,
            )
        sink.take(frame, run.attempt.extra)

    def _retry_in_place(self, run: Run, frame: dict[str, Any]) -> bool:
        """A keyed run whose task raised an error its ``retries``/``retry_for`` allow runs
        again as the same run, attempt + 1 (as a requeue does), so the ledger keeps one
        run and its final outcome. Not under ``detach``: its worker records its own ending
        in the ledger, first writer wins, so a later attempt's outcome could not land."""
        spec = run.attempt.extra.get("in_place_retries")
        if (spec is None or run.attempt.idempotency_key is None or run.cancel_requested
                or run.attempt.policy.orphan_policy == "detach"):
            return False
        retries, retry_for = spec
        spent = int(run.attempt.extra.get("retried", 0))
        if spent >= retries or not retry_allowed(frame, retry_for):
            return False
        run.attempt.extra["retried"] = spent + 1
        error = frame.get("error") or {}
        reason = f"{error.get('kind', 'error')}: {error.get('message', '')}".strip()
        if observe.observers:
            self._observed(observe.attempt_ended, run, "retried", reason)
        self._spawn(self._run_again(run, f"failed ({reason}); retried in place"))
        return True

    async def _run_again(self, run: Run, why: str) -> None:
        """The run's next attempt: same run id, attempt + 1, launched anew (events of the
        previous attempt are dropped as stale from here on)."""
        attempt = run.attempt
        where = f"task '{attempt.task_id}' (run {attempt.run_id}, attempt {attempt.attempt})"
        await self.transport.release(attempt)
        attempt.attempt += 1
        attempt.submission = None
        run.started = run.heard = False
        run.launched = False
        run.pending_warn_at = run.pending_check_at = 0.0
        self._broadcast(
            run, frames.event_of(attempt, frames.LOG, message=f"{where} {why}", level="warning")
        )
        number, rid = attempt.attempt, attempt.run_id
        self._ledger_later(Update(rid, {"attempt": number}))
        self._release_slot(run)
        run.launch_task = self._spawn(self._launch(run))

    def _broadcast(self, run: Run, frame: dict[str, Any]) -> None:
        for run_id, listener in list(run.listeners):
            out = frame if run_id == frame.get("run_id") else {**frame, "run_id": run_id}
            try:
                listener(out)
            except Exception:
                log.exception("event listener failed for run %s", run_id)

    def _finish(
        self,
        run: Run,
        frame: dict[str, Any],
        *,
        record_outcome: bool = True,
        until_stopped: bool = False,
    ) -> None:
        """Deliver the one terminal event a caller sees; later ones are dropped.

        ``until_stopped``: the caller is resolved by a verdict of ours (a cancel nobody
        confirmed yet, a timeout) while the job may still be running; it keeps its
        ``delivery_max_in_flight`` slot until the backend says it stopped."""
        if run.done.is_set():
            self.stats["duplicate_terminal_dropped"] += 1
            return
        run.terminal = frame
        run.done.set()
        if observe.observers:
            self._observed(observe.run_ended, run, frame)
        if run.timer is not None:
            run.timer.cancel()
        hold = until_stopped and run.launched and run.holds_slot
        if hold:
            self._hold_until_stopped(run)
        else:
            self._release_slot(run)
        self.runs.pop(run.run_id, None)
        key = run.attempt.idempotency_key
        if key is not None and self.by_key.get(key) is run:
            self.by_key.pop(key, None)
        frame.pop("_lost_reason", None)
        shown = {k: v for k, v in frame.items() if k != "_blob"}
        if run.attempt.extra.get("retried"):
            shown["retried_in_place"] = run.attempt.extra["retried"]
        self._broadcast(run, shown)
        if record_outcome:
            self._store_outcome(run, frame)
        if run.launched and run.run_id not in self.detached and not hold:
            self._release_soon(run.attempt)

    def _observed(self, hook: Callable[..., None], run: Run, *args: Any) -> None:
        """Tell the installed observers (``core.observe``) about ``run``; call sites
        test ``observe.observers`` first, so nothing is built when none is installed."""
        hook(self.environment, self.transport.name, run, *args)

    def _release_slot(self, run: Run) -> None:
        if run.holds_slot and run.semaphore is not None:
            run.holds_slot = False
            run.semaphore.release()
        if run.controlled:
            run.controlled = False
            self.controls.release(run.run_id)

    def _hold_until_stopped(self, run: Run) -> None:
        """Keep the slot of a job that may still run; its registration at the transport
        stays too, so the worker's terminal event (the proof it stopped) still reaches
        us. Reconciliation polls such runs; ``cancel_release_seconds`` bounds the wait."""
        self.stopping[run.run_id] = run
        run.stop_timer = asyncio.get_running_loop().call_later(
            self._cancel_release, self._give_up_stopping, run.run_id
        )

    def _give_up_stopping(self, run_id: str) -> None:
        run = self.stopping.get(run_id)
        if run is None:
            return
        self.stats["released_unconfirmed"] += 1
        log.warning(
            "environment '%s' (%s): run %s of task '%s' was cancelled %.0fs ago and the "
            "backend never confirmed that it stopped; its delivery_max_in_flight slot is "
            "released now, though the work may still be running "
            "(executor_config.cancel_release_seconds)",
            self.environment, self.transport.name, run_id, run.attempt.task_id,
            self._cancel_release,
        )
        self._stopped(run)

    def _stopped(self, run: Run) -> None:
        """The job of a cancelled run stopped (or we gave up waiting): free its slot."""
        if self.stopping.pop(run.run_id, None) is None:
            return
        if run.stop_timer is not None:
            run.stop_timer.cancel()
            run.stop_timer = None
        self._release_slot(run)
        self._spawn(self.transport.release(run.attempt))

    def _store_outcome(self, run: Run, frame: dict[str, Any]) -> None:
        state = _STATE_OF_EVENT.get(frame.get("type", ""), FAILED)
        if frame.get("error", {}).get("source") == "orphan":
            state = LOST
        blob = frame.get("_blob")
        policy = run.attempt.policy
        # Callers in other processes may answer with this outcome: keep it signed.
        durable = (
            run.attempt.idempotency_key is not None
            or policy.orphan_policy == "detach"
            or policy.controls.active
        )
        # Every ending but a plain success keeps its signed event, so `wove-adapters
        # result` can say why a run failed, timed out, was cancelled or was lost.
        if blob is None and (durable or state != SUCCEEDED):
            blob = self._sign_outcome(frame, run.attempt.idempotency_key)
        run_id = run.run_id
        if blob is not None:
            data = blob
            self._ledger_later(SetOutcome(run_id, state, data))
        else:
            self._ledger_later(Update(run_id, {"state": state}))
        if durable:
            # Other callers answer from this outcome (the key's followers, `result` after
            # a detach): it goes now, not after the write window.
            self._ledger_later(None)

    def _sign_outcome(self, frame: dict[str, Any], key: str | None) -> bytes | None:
        try:
            event = frame_to_wire(frame, idempotency_key=key)
            return signing.encode_blob(sign_events([event], self.key_id))
        except Exception:
            log.warning("could not record the outcome of %s in the ledger", frame.get("run_id"))
            return None

    # ---------------------------------------------------------- policies

    async def _on_timeout(self, run: Run) -> None:
        # An outcome already in a socket or pipe (read late after a stall of this
        # process) was in time: read it first.
        await asyncio.sleep(0.05)
        if run.done.is_set():
            return
        policy = run.attempt.policy
        # The verdict first, then the cancel: the worker's task_cancelled (the cancel
        # working) must not reach the caller as the run's outcome instead of the timeout.
        self._finish(
            run,
            frames.error_event(
                run.run_id,
                run.attempt.task_id,
                DeliveryTimeoutError(
                    f"Delivery timeout exceeded for task '{run.attempt.task_id}' "
                    f"({policy.timeout}s) in environment '{self.environment}'; the run was "
                    f"cancelled ({policy.cancel_mode})."
                ),
                attempt=run.attempt.attempt,
                source="timeout",
            ),
            until_stopped=True,
        )
        with contextlib.suppress(Exception):
            await self.transport.cancel(run.attempt, mode=policy.cancel_mode)

    async def _orphan(self, run: Run, reason: str, *, shutting_down: bool = False) -> None:
        """Apply the run's orphan policy to a lost run."""
        if run.done.is_set() or run.finishing or run.orphaning:
            return
        run.orphaning = True
        try:
            await self._apply_orphan_policy(run, reason, shutting_down=shutting_down)
        finally:
            run.orphaning = False

    async def _apply_orphan_policy(self, run: Run, reason: str, *, shutting_down: bool) -> None:
        self.stats["lost"] += 1
        policy = run.attempt.policy.orphan_policy
        attempt = run.attempt
        where = f"task '{attempt.task_id}' (run {attempt.run_id}, attempt {attempt.attempt})"
        if policy == "requeue" and not shutting_down:
            if attempt.attempt <= attempt.policy.max_requeues:
                with contextlib.suppress(Exception):
                    await self.transport.cancel(attempt, mode="best_effort")
                if run.done.is_set():  # its outcome arrived meanwhile: not lost after all
                    return
                self.stats["requeued"] += 1
                if observe.observers:
                    self._observed(observe.attempt_ended, run, "requeued", reason)
                await self._run_again(run, f"was lost ({reason}); requeued")
                return
            reason = f"{reason}; gave up after {attempt.policy.max_requeues} requeues"
        if policy == "cancel":
            with contextlib.suppress(Exception):
                await self.transport.cancel(attempt, mode="best_effort")
            self._finish(
                run,
                frames.event_of(
                    attempt, frames.TASK_CANCELLED,
                    reason=f"orphaned: {reason}",
                ),
            )  # recorded as cancelled, with that reason (states only move forward)
            return
        if policy == "detach" and self.transport.capabilities.detach:
            run.finishing = True
            if not run.launched and run.launch_task is not None:
                # A detached run must exist at the backend before the caller lets go of it.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(run.launch_task), _LAUNCH_BOUND)
            if run.done.is_set():
                return
            await self.transport.detach(attempt)
            self.detached[attempt.run_id] = run
            rid = attempt.run_id
            self._ledger_later(Update(rid, {"state": DETACHED}))
            url = self.ledger.url if self.ledger.shareable else None
            self._finish(
                run,
                frames.error_event(
                    attempt.run_id,
                    attempt.task_id,
                    DeliveryDetachedError(
                        f"{where} detached ({reason}); it keeps running and its outcome "
                        f"will be in the ledger: wove-adapters result {attempt.run_id}"
                        + (f" --ledger {url}" if url else ""),
                        run_id=attempt.run_id,
                        ledger=url,
                    ),
                    attempt=attempt.attempt,
                    source="orphan",
                ),
                record_outcome=False,
            )
            return
        with contextlib.suppress(Exception):
            await self.transport.cancel(attempt, mode="best_effort")
        self._finish(
            run,
            frames.error_event(
                attempt.run_id,
                attempt.task_id,
                DeliveryOrphanedError(
                    f"{where} in environment '{self.environment}' was lost: {reason} "
                    f"(delivery_orphan_policy='{policy}')",
                    run_id=attempt.run_id,
                ),
                attempt=attempt.attempt,
                source="orphan",
            ),
        )

    async def cancel(self, run_id: str, mode: str | None = None) -> None:
        """Cancel a run. ``best_effort`` resolves the caller at once; ``require_ack`` waits
        for the worker or backend to confirm and raises CancelNotAcknowledgedError."""
        run = self.runs.get(run_id) or self._find_attached(run_id)
        if run is None or run.done.is_set():
            return
        mode = mode or run.attempt.policy.cancel_mode
        run.cancel_requested = True
        if not run.launched and run.launch_task is not None and not run.started:
            if not run.submitting:
                # Never reached the backend: nothing to confirm.
                run.launch_task.cancel()
                self._finish(run, self._cancelled(run, "cancelled before submission"))
                return
            # The backend may already hold the job (a process spawned, a message sent):
            # let the hand-over finish, then cancel it there.
            with contextlib.suppress(Exception):
                await asyncio.shield(run.launch_task)
            if run.done.is_set():
                return
        try:
            await self.transport.cancel(run.attempt, mode=mode)
        except Exception as exc:
            if mode == "require_ack":
                error = CancelNotAcknowledgedError(f"cancel of run {run_id} failed: {exc}")
                self._finish(
                    run, frames.error_event(run_id, run.attempt.task_id, error),
                    until_stopped=True,
                )
                raise error from exc
            log.warning("best-effort cancel of %s failed: %s", run_id, exc)
        if mode == "best_effort":
            self._finish(
                run,
                self._cancelled(run, "cancelled by the caller (best effort)"),
                until_stopped=True,
            )
            return
        timeout = run.attempt.policy.cancel_ack_timeout
        try:
            await asyncio.wait_for(run.done.wait(), timeout)
        except asyncio.TimeoutError:
            error = CancelNotAcknowledgedError(
                f"Cancellation of task '{run.attempt.task_id}' (run {run_id}) was not "
                f"acknowledged by '{self.transport.name}' within {timeout}s; the work may "
                f"still be running."
            )
            self._finish(
                run,
                frames.error_event(run_id, run.attempt.task_id, error, source="cancel"),
                until_stopped=True,
            )
            raise error from None

    def _cancelled(self, run: Run, reason: str) -> dict[str, Any]:
        return frames.event(
            frames.TASK_CANCELLED,
            run.run_id,
            run.attempt.task_id,
            run.attempt.attempt,
            reason=reason,
        )

    def _find_attached(self, run_id: str) -> Run | None:
        for run in self.runs.values():
            if any(rid == run_id for rid, _ in run.listeners):
                return run
        return None

    async def abandon(self, run_ids: list[str], *, reason: str) -> None:
        """The caller goes away with these runs in flight: apply each one's orphan policy."""
        for run_id in run_ids:
            run = self.runs.get(run_id) or self._find_attached(run_id)
            if run is None or run.done.is_set():
                continue
            others = [rid for rid, _ in run.listeners if rid not in run_ids]
            if others:
                run.listeners = [(rid, cb) for rid, cb in run.listeners if rid in others]
                continue
            await self._orphan(run, reason, shutting_down=True)

    # ---------------------------------------------------------- watching

    async def _watch(self) -> None:
        """Heartbeat lapses and reconciliation, on one timer for all runs.

        Silence is judged on the worker's side of the clock: time the caller itself did
        not run (see ``_pause``) is not the worker's silence, and a verdict waits until
        the events already in sockets and pipes have been read."""
        last_reconcile = time.monotonic()
        while True:
            if not await self._pause(self._tick()):
                last_reconcile = time.monotonic()
                continue
            now = time.monotonic()
            if now < self._quiet_until:
                continue
            # Methods, not loops here: a loop variable in _watch would keep the last run
            # seen (its callable, its result) alive for as long as the watcher sleeps.
            self._check_heartbeats(now)
            self._check_pending(now)
            if self.transport.capabilities.status and now - last_reconcile >= self._reconcile_every:
                last_reconcile = now
                await self._reconcile(now)

    async def _pause(self, seconds: float) -> bool:
        """Sleep; False when the caller's own loop stalled meanwhile (it woke much later
        than asked). Then every run's silence clock restarts, and no verdict is given for
        ``stall_grace_seconds``: liveness counts only time the caller was running."""
        before = time.monotonic()
        await asyncio.sleep(seconds)
        now = time.monotonic()
        late = now - before - seconds
        if late <= max(_STALL_MIN, seconds):
            return True
        self.stats["caller_stalls"] += 1
        self._quiet_until = max(self._quiet_until, now + self._stall_grace)
        for run in self.runs.values():
            run.last_seen = max(run.last_seen, now)
            run.pending_since += late
        log.warning(
            "environment '%s': this process did not run for %.1fs (stopped, a long GC "
            "pause, or a blocking call on its event loop); no run is judged lost for the "
            "next %.1fs, so events that waited meanwhile land first",
            self.environment, late, self._stall_grace,
        )
        return False

    def _check_heartbeats(self, now: float) -> None:
        lapsed = [
            run
            for run in self.runs.values()
            if run.attempt.policy.heartbeat_seconds
            and run.started
            and not run.judging
            and not run.done.is_set()
            and now - run.last_seen > run.attempt.policy.heartbeat_seconds
        ]
        if lapsed:
            for run in lapsed:
                run.judging = True
            self._spawn(self._judge_silence(lapsed))

    async def _judge_silence(self, lapsed: list[Run]) -> None:
        """Heartbeat lapses: read what is already on the wire, then judge again."""
        attempts = {run.run_id: run.attempt.attempt for run in lapsed}
        try:
            if not await self._pause(_SETTLE):
                return
            now = time.monotonic()
            if now < self._quiet_until:
                return
            for run in lapsed:
                hb = run.attempt.policy.heartbeat_seconds
                if (
                    hb
                    and not run.done.is_set()
                    and run.attempt.attempt == attempts[run.run_id]
                    and now - run.last_seen > hb
                ):
                    self._spawn(
                        self._orphan(
                            run,
                            f"no heartbeat for {now - run.last_seen:.1f}s "
                            f"(delivery_heartbeat_seconds={hb})",
                        )
                    )
        finally:
            for run in lapsed:
                run.judging = False

    def _tick(self) -> float:
        windows = {self._pending_warning}
        for run in self.runs.values():
            policy = run.attempt.policy
            if policy.heartbeat_seconds:
                windows.add(policy.heartbeat_seconds)
            if policy.max_pending_seconds:
                windows.add(policy.max_pending_seconds)
        return max(min([self._reconcile_every, *[w / 4 for w in windows]]), 0.02)

    # ---------------------------------------------------------- runs that never start

    def _check_pending(self, now: float) -> None:
        """Launched runs that have not started: lost past ``delivery_max_pending_seconds``;
        without it, reported at ``pending_warning_seconds`` and each doubling of it, so a
        run the backend will never start (a message lost with its broker, a worker killed
        with prefetched messages, no worker on the queue) is never waited on in silence."""
        warn: list[tuple[Run, float]] = []
        judge: list[tuple[Run, float]] = []
        for run in self.runs.values():
            if not run.launched or run.started or run.heard or run.finishing:
                continue
            if run.done.is_set():
                continue
            age = now - run.pending_since
            limit = run.attempt.policy.max_pending_seconds
            if limit is not None:
                if age > limit and now >= run.pending_check_at and self._judges_pending():
                    run.pending_check_at = float("inf")  # one judgement at a time
                    judge.append((run, limit))
                continue
            threshold = run.pending_warn_at or self._pending_warning
            if age >= threshold:
                while age >= threshold:
                    threshold *= 2
                run.pending_warn_at = threshold
                warn.append((run, age))
        if judge:
            self._spawn(self._judge_pending_all(judge))
        if warn:
            self._spawn(self._warn_pending(warn))

    def _judges_pending(self) -> bool:
        """Without events (heartbeats off: a native result path) only the backend's status
        can tell a queued run from a running one; without that, nothing is judged."""
        caps = self.transport.capabilities
        return caps.heartbeats or caps.status

    async def _backend_states(self, runs: list[Run]) -> dict[str, tuple[JobState | None, str]]:
        """The backend's view of some runs (one ``status_many``), and how to say each in
        a message."""
        if not self.transport.capabilities.status:
            described = f"not reported (the '{self.transport.name}' executor has no status)"
            return {run.run_id: (None, described) for run in runs}
        try:
            states = await asyncio.wait_for(
                self.transport.status_many([run.attempt for run in runs]), _STATUS_BOUND
            )
        except Exception as exc:
            described = f"unknown (status failed: {type(exc).__name__}: {exc})"
            return {run.run_id: (None, described) for run in runs}
        waiting = [run for run in runs if states.get(run.run_id) is JobState.PENDING]
        reasons: dict[str, str] = {}
        if waiting:
            with contextlib.suppress(Exception):  # a reason only adds to the message
                reasons = await asyncio.wait_for(
                    self.transport.waiting_reasons([run.attempt for run in waiting]),
                    _STATUS_BOUND,
                )
        told: dict[str, tuple[JobState | None, str]] = {}
        for run in runs:
            if (state := states.get(run.run_id)) is None:
                told[run.run_id] = (None, "unknown (status failed)")
            elif (reason := reasons.get(run.run_id)) is not None:
                told[run.run_id] = (state, f"{state.value} ({reason})")
            else:
                told[run.run_id] = (state, state.value)
        return told

    async def _judge_pending_all(self, runs: list[tuple[Run, float]]) -> None:
        """Runs past their ``delivery_max_pending_seconds``: one status round for all."""
        try:
            found = await self._backend_states([run for run, _ in runs])
        except BaseException:
            for run, _ in runs:
                run.pending_check_at = time.monotonic() + self._reconcile_every
            raise
        await asyncio.gather(
            *(self._judge_pending(run, limit, *found[run.run_id]) for run, limit in runs)
        )

    async def _judge_pending(
        self, run: Run, limit: float, state: JobState | None, described: str
    ) -> None:
        attempt_number = run.attempt.attempt
        verdict = False
        try:
            if not self.transport.capabilities.heartbeats:
                # No events to wait for: only a backend that says queued (or gone) counts.
                verdict = state in (JobState.PENDING, JobState.GONE)
            else:
                # The backend says the job ended: reconciliation decides (a short task
                # sends no task_started, and its outcome may still be on its way).
                verdict = state is None or not state.finished or state is JobState.GONE
            if not verdict or not await self._pause(_SETTLE):
                verdict = False
                return
            now = time.monotonic()
            verdict = (
                not run.done.is_set()
                and not run.started
                and not run.heard
                and run.attempt.attempt == attempt_number
                and now >= self._quiet_until
                and now - run.pending_since > limit
            )
            if verdict:
                await self._orphan(
                    run,
                    f"not started within {limit:g}s (delivery_max_pending_seconds); "
                    f"backend state: {described}",
                )
        finally:
            if not verdict and run.attempt.attempt == attempt_number:
                run.pending_check_at = time.monotonic() + self._reconcile_every

    async def _warn_pending(self, runs: list[tuple[Run, float]]) -> None:
        found = await self._backend_states([run for run, _ in runs[:_WARN_LINES]])
        for run, age in runs[:_WARN_LINES]:
            _, described = found[run.run_id]
            attempt = run.attempt
            log.warning(
                "environment '%s' (%s): run %s of task '%s' (attempt %d) has not started "
                "%.0fs after it was submitted; backend state: %s. If it is only queued, "
                "nothing is wrong; if no worker will ever take it (a worker killed with "
                "prefetched messages, a message lost with its broker, no worker on the "
                "queue), set delivery_max_pending_seconds so such runs are treated as lost "
                "(requeue submits them again)",
                self.environment, self.transport.name, attempt.run_id, attempt.task_id,
                attempt.attempt, age, described,
            )
        if len(runs) > _WARN_LINES:
            log.warning(
                "environment '%s' (%s): %d more runs have not started after %.0fs or more",
                self.environment, self.transport.name, len(runs) - _WARN_LINES,
                min(age for _, age in runs),
            )

    async def _reconcile(self, now: float) -> None:
        """One ``status_many`` per tick for every run the watcher wonders about: cancelled
        runs still holding their slot, and launched runs silent for ``reconcile_seconds``."""
        if now < self._quiet_until:
            return
        stopping = list(self.stopping.values())
        quiet = [
            run
            for run in self.runs.values()
            if run.launched
            and not run.done.is_set()
            and now - run.last_seen >= self._reconcile_every
        ]
        if not stopping and not quiet:
            return
        try:
            states = await asyncio.wait_for(
                self.transport.status_many([run.attempt for run in (*stopping, *quiet)]),
                _STATUS_BOUND,
            )
        except Exception as exc:
            log.debug("status of %d runs failed: %r", len(stopping) + len(quiet), exc)
            return
        self._reconcile_stopping(stopping, states)
        suspects: list[tuple[Run, int, JobState]] = []
        for run in quiet:
            state = states.get(run.run_id)
            if state is not None and state.finished and not run.done.is_set():
                suspects.append((run, run.attempt.attempt, state))
        if not suspects:
            return
        # Give events already on the wire a moment to land before calling anything lost:
        # one pause per round, not one per run (90 runs lost with a broker took 45 s).
        grace = self.executor_config.get("reconcile_grace")
        if not await self._pause(float(shared_default("reconcile_grace") if grace is None
                                       else grace)):
            return  # the caller stalled: what it did not read yet is not silence
        for run, attempt_number, state in suspects:
            if (
                not run.done.is_set()
                and run.attempt.attempt == attempt_number
                and time.monotonic() >= self._quiet_until
            ):
                # Whether it ever ran is the backend's to know (a worker that died at once
                # sends nothing either): say only what was seen.
                silent = not run.started and not run.heard
                self._spawn(
                    self._orphan(
                        run,
                        f"the backend reports the job {state.value} without a terminal event"
                        + ("; no event was ever heard from it" if silent else ""),
                    )
                )

    def _reconcile_stopping(self, stopping: list[Run], states: dict[str, JobState]) -> None:
        """Cancelled runs still holding their slot: free it once the backend reports
        the job finished or gone (a job cancelled while queued sends no event)."""
        for run in stopping:
            state = states.get(run.run_id)
            if state is not None and state.finished and self.stopping.get(run.run_id) is run:
                self._stopped(run)

    # ---------------------------------------------------------- ledger, tasks

    def _ledger_later(self, op: LedgerWrite | None) -> asyncio.Future[Any]:
        """Queue a ledger write (a claim as its record, an update or an outcome as its
        struct; None marks a point ``flush`` waits for); writes apply in order. The future
        resolves when it has."""
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._ledger_task is None or self._ledger_task.done() or self._ledger_stopping:
            # Stopped (or never started): nothing would apply it, so say so now.
            done.set_exception(RuntimeError(f"the dispatcher of '{self.environment}' stopped"))
            done.exception()  # retrieved: the caller may not look
            log.warning("ledger write after stop dropped (environment %s)", self.environment)
            return done
        self._ledger_queue.put_nowait((op, done))
        return done

    async def _ledger_writer(self) -> None:
        """Apply queued writes in order, a loop turn's worth at a time, as one
        ``write_many`` (one hand-off, one transaction on SQLite and PostgreSQL).

        Claims of keyed runs go at once: such a run is launched only once its claim is
        committed. A run's other writes (an unkeyed run's record, written while its job
        is handed over, its state changes, its outcome) may wait up to ``_WRITE_WINDOW``
        for company, so they share one commit, and a record still queued takes its
        run's later writes into its own insert (``_fold``); the next keyed claim,
        ``flush`` or stop takes them along at once. The queue's ``get`` is never
        cancelled, so no write can be lost between a timeout and its delivery."""
        loop = asyncio.get_running_loop()
        pending: list[tuple[LedgerWrite | None, asyncio.Future[Any]]] = []
        deadline: float | None = None
        getter: asyncio.Task[Any] | None = None
        try:
            while True:
                if getter is None:
                    getter = loop.create_task(self._ledger_queue.get())
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait([getter], timeout=timeout)
                items = []
                if getter.done():
                    items.append(getter.result())
                    getter = None
                    await asyncio.sleep(0)  # this loop turn's writes queue theirs
                    while not self._ledger_queue.empty():
                        items.append(self._ledger_queue.get_nowait())
                stop = None in items
                entries = [entry for entry in items if entry is not None]
                pending.extend(entries)
                urgent = stop or any(_urgent(op) for op, _ in entries)
                expired = deadline is not None and deadline <= loop.time()
                if pending and (urgent or not items or expired):
                    batch, pending, deadline = pending, [], None
                    await self._write_batch(batch)
                elif pending and deadline is None:
                    deadline = loop.time() + _WRITE_WINDOW
                if stop:
                    return
        finally:
            if getter is not None:
                getter.cancel()

    async def _write_batch(
        self, batch: list[tuple[LedgerWrite | None, asyncio.Future[Any]]]
    ) -> None:
        """One ``write_many`` for the batch's writes; each future gets its write's result
        (a flush marker's once everything before it is applied)."""
        writes, folded = _fold([(op, done) for op, done in batch if op is not None])
        results: list[object] = []
        if writes:
            try:
                results = await self.ledger.write_many([op for op, _ in writes])
            except Exception as exc:
                results = [exc] * len(writes)
        for (_, done), result in zip(writes, results, strict=True):
            if isinstance(result, Exception):
                _fail(done, result, self.ledger.url)
            elif not done.done():
                done.set_result(result)
            for answer, later in folded.get(id(done), ()):
                if isinstance(result, Exception):
                    _fail(later, result, self.ledger.url)
                elif not later.done():
                    later.set_result(answer)
        for op, done in batch:
            if op is None and not done.done():
                done.set_result(None)

    async def _stop_ledger_writer(self) -> None:
        """Apply every write queued so far, then end the writer."""
        task = self._ledger_task
        if task is None or task.done():
            return
        self._ledger_stopping = True
        self._ledger_queue.put_nowait(None)
        await asyncio.shield(task)

    async def flush(self) -> None:
        """Wait until every ledger write queued so far has been applied."""
        with contextlib.suppress(Exception):
            await self._ledger_later(None)

    def _release_soon(self, attempt: RunAttempt) -> None:
        """``transport.release`` of the runs that ended in one loop iteration, in one
        background step (a task per ended run cost more than most releases do)."""
        self._releasing.append(attempt)
        if len(self._releasing) == 1:
            asyncio.get_running_loop().call_soon(self._release_batch)

    def _release_batch(self) -> None:
        batch, self._releasing = self._releasing, []
        if batch:
            self._spawn(self._release_all(batch))

    async def _release_all(self, batch: list[RunAttempt]) -> None:
        for attempt in batch:
            try:
                await self.transport.release(attempt)
            except Exception:
                log.exception("releasing run %s failed", attempt.run_id)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        """Start a background step this dispatcher owns: ``stop`` awaits or cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task
