"""The worker side: verify a payload, run its task, report events, never lose the outcome.

Any backend's worker runs a payload with one call: ``run(payload)`` from sync code (a
Celery or RQ task body), ``await arun(payload)`` from async code (ARQ, Taskiq), or
``python -m wove_adapters.worker`` from a batch script. The payload is verified before
anything is unpickled. The task runs in the calling thread (so SIGTERM can interrupt it);
heartbeats come from a timer thread. The terminal event gets one inline try that waits
at most ``sender.ACK_GRACE`` for the caller's answer; when the caller does not answer
in time, the outcome is recorded in the ledger the envelope names before the worker
slot is freed, and the process's outbox (``worker.sender``) delivers it in the
background. A failing task's event carries its traceback (the caller chains
it to the rebuilt exception, see ``core.codec``); a task whose module the worker cannot
import fails with ``WorkerImportError`` naming the backend, host, pid and the fix. A
result (or pickled exception) above ``RESULT_INLINE_LIMIT`` waits in the store the payload
names, and its event carries a reference with its sha256, checked before unpickling.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import itertools
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, stores
from wove_adapters.core.codec import BY_REFERENCE, pickled_exception, sign_events
from wove_adapters.core.envelope import Envelope
from wove_adapters.core.errors import (
    PayloadError,
    WorkerImportError,
    ledger_url_for_worker,
    redact_url,
)
from wove_adapters.core.policies import RunState
from wove_adapters.worker import sender, tasklogs

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_PAYLOAD_REFUSED = 2
EXIT_DELIVERY_FAILED = 3
EXIT_USAGE = 64  # sysexits EX_USAGE: the worker was started wrongly
EXIT_CANCELLED = 143


def worker_command(python: str, *args: str) -> list[str]:
    """The command a batch job's container or script runs (Kubernetes, AWS Batch, Slurm,
    the process adapter): one payload, then exit with one of the codes above."""
    return [python, "-m", "wove_adapters.worker", *args]


class TaskCancelled(BaseException):
    """Raised inside a running task when its run is cancelled (SIGTERM, cancel frame).

    A BaseException so ``except Exception`` in user code does not swallow it."""


@dataclass
class Outcome:
    state: RunState  # SUCCEEDED | FAILED | CANCELLED | REFUSED
    value: Any = None
    error: BaseException | None = None
    # False only when the outcome is known lost (neither delivered nor recorded). While
    # the outbox still owns it (``pending``), it is presumed on its way.
    delivered: bool = True
    pending: sender.Pending | None = None
    # The terminal event the caller was sent (None for a refused payload): what a backend
    # keeps, signed, for another caller that holds the same idempotency key.
    event: frames.WireEvent | None = None
    key_id: str = ""  # the key the payload was signed with: the event is signed with it
    # The task outlived the short-task window: task_started went out (``run_envelope``).
    started: bool = False
    # The run's captured log frames not sent yet: they go ahead of its terminal event,
    # in the same batch (``worker.tasklogs``; empty unless the run asked for them).
    logs: list[frames.Log] = field(default_factory=list)

    def signed(self) -> bytes | None:
        """The terminal event as a signed blob, for a backend to keep for other callers
        with the same idempotency key (``core.codec.decode_outcome`` reads it): the one
        place a worker signs an outcome. None for a refused payload, or if signing
        failed (the caller has the event itself; followers then get an error)."""
        if self.event is None or not self.key_id or self.state is RunState.REFUSED:
            return None
        from wove_adapters.core.signing import encode_blob

        try:
            return encode_blob(sign_events([self.event], self.key_id))
        except Exception:
            return None

    @property
    def exit_code(self) -> int:
        if not self.delivered:
            return EXIT_DELIVERY_FAILED
        return {
            RunState.SUCCEEDED: EXIT_OK,
            RunState.FAILED: EXIT_TASK_FAILED,
            RunState.CANCELLED: EXIT_CANCELLED,
        }.get(self.state, EXIT_PAYLOAD_REFUSED)

    def settle(self, *, linger: bool = True, refused_too: bool = False) -> bool:
        """For a process about to exit (it would take the outbox's thread with it): wait
        until the terminal event is delivered or recorded in the ledger, within its retry
        budget. ``linger`` also gives a recorded-but-undelivered event up to its
        ``exit_flush_seconds`` to reach the caller, if the caller's port did not refuse
        the connection (or ``refused_too``: nothing waits for this process's slot).
        Sets and returns ``delivered``."""
        item = self.pending
        if item is None:
            return self.delivered
        if linger:
            sender.OUTBOX.flush(
                item.retry_seconds + item.exit_flush_seconds,
                linger=True,
                refused_too=refused_too,
            )
        else:
            item.wait_safe(item.retry_seconds + 1.0)
        self.delivered = item.safe.is_set()
        return self.delivered


# ---------------------------------------------------------------- running one callable


def call_task(func: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call sync or async task code from this (non-loop) thread."""
    result = func(**args)
    if inspect.isawaitable(result):
        import asyncio  # only async task code pays for it

        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


class SignalCancels:
    """A signal (SIGTERM on queue workers, ``ray.cancel``'s SIGINT on Ray) raises
    TaskCancelled in the main thread while a task runs there.

    One handler per process and signal, installed by the first task and kept (installed
    again only if something replaced it): swapping handlers around every task cost two
    ``signal.signal`` calls per task. Between tasks the handler does what the handler it
    replaced would have done (a Celery prefork child's is the default: the process
    ends), so a worker that runs no task reacts to the signal as it did without us.
    Signal handlers can only be set from the main thread; tasks in other threads are not
    interrupted (as before)."""

    def __init__(self, signum: int, reason: str) -> None:
        self.signum = signum
        self.reason = reason
        self.running = 0  # tasks inside ``cancels()`` in the main thread
        self.previous: Any = signal.SIG_DFL
        self.handler = self._handle  # one bound method: getsignal() compares identity

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.running:
            raise TaskCancelled(self.reason)
        previous = self.previous
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # SIG_DFL, or a handler set outside Python
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    @contextmanager
    def cancels(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        current = signal.getsignal(self.signum)
        if current is not self.handler:
            signal.signal(self.signum, self.handler)
            self.previous = current
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


# The reason the caller's exception carries when the worker reports the cancel first (a
# revoke's SIGTERM can beat the caller's own best-effort verdict): say it was a cancel.
_SIGTERM = SignalCancels(signal.SIGTERM, f"cancelled (SIGTERM, signal {int(signal.SIGTERM)})")


def sigterm_cancels() -> AbstractContextManager[None]:
    """Within the block, SIGTERM raises TaskCancelled in the main thread (see
    ``SignalCancels``: one handler per process, no swap per task)."""
    return _SIGTERM.cancels()


class _Heart:
    """One daemon thread beats for every running task in this process (a worker running
    thousands of short tasks must not start a thread per task).

    Most tasks end before their first beat is due (the short-task window,
    ``STARTED_AFTER``), so registering one must cost almost nothing: ``add`` puts the
    task in a dict of young entries, without a lock, and ``remove`` takes it out again.
    The thread sleeps until the earliest due time it knows of and publishes it
    (``_wake_at``); ``add`` wakes it only for an entry due before that (the first task
    after an idle spell, or a task beside a long one), never in a run of short tasks,
    where the thread wakes about once per window instead of once per task. Entries
    whose first beat is due move into the schedule the thread keeps under its lock."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Fresh state (also in a forked child: the parent's thread and lock stay behind)."""
        self._cond = threading.Condition()
        self._young: dict[int, tuple[float, float, Callable[[], object]]] = {}
        self._beats: dict[int, tuple[float, float, Callable[[], object]]] = {}
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._wake_at = math.inf  # when the sleeping thread looks next; 0: it is awake
        self._adds = 0  # entries added so far (read by the thread: were there any lately?)
        self._adds_seen = 0

    def add(self, first: float, interval: float, beat: Callable[[], object]) -> int:
        """Call ``beat`` after ``first`` s, then every ``interval`` s; a number it returns
        sets the next delay."""
        ident = next(self._ids)
        self._adds += 1
        at = time.monotonic() + first
        self._young[ident] = (at, interval, beat)
        if self._wake_at > at:  # read after the insert: see _loop
            with self._cond:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._loop, daemon=True, name="wove-heartbeat"
                    )
                    self._thread.start()
                self._cond.notify()
        return ident

    def remove(self, ident: int) -> None:
        if self._young.pop(ident, None) is None:  # promoted (or being promoted, locked)
            with self._cond:
                self._beats.pop(ident, None)

    def _loop(self) -> None:
        while True:
            due: list[tuple[int, Callable[[], object]]] = []
            with self._cond:
                self._wake_at = 0.0  # awake: it looks at every young entry below
                now = time.monotonic()
                wake = math.inf
                for ident, (at, interval, beat) in list(self._young.items()):
                    if at > now:
                        wake = min(wake, at)
                    elif self._young.pop(ident, None) is not None:  # else: just ended
                        self._beats[ident] = (interval, at, beat)
                for ident, (interval, at, beat) in list(self._beats.items()):
                    if at <= now:
                        due.append((ident, beat))
                        at = now + interval
                        self._beats[ident] = (interval, at, beat)
                    wake = min(wake, at)
                if wake == math.inf and self._adds != self._adds_seen:
                    # Entries came and went since the last look (a run of short tasks):
                    # stay up one more window, so the next ones' ``add`` need not wake
                    # this thread (their entries are due after it looks again).
                    self._adds_seen = self._adds
                    wake = now + STARTED_AFTER
                if not due:
                    # Publish the wake time, then look once more: ``add`` inserts, then
                    # reads ``_wake_at``. Either it read this value (and notifies if its
                    # entry is due earlier, once this thread waits), or it read an older
                    # one, and its entry is already in the dict read here.
                    self._wake_at = wake
                    for at, _, _ in list(self._young.values()):
                        wake = min(wake, at)
                    self._cond.wait(None if wake == math.inf else max(wake - now, 0.001))
                    continue
            for ident, beat in due:
                try:
                    delay = beat()
                except Exception:  # a lost heartbeat must not kill the task
                    continue
                if isinstance(delay, (int, float)):
                    with self._cond:
                        entry = self._beats.get(ident)
                        if entry is not None:
                            self._beats[ident] = (entry[0], time.monotonic() + delay, entry[2])


_HEART = _Heart()
os.register_at_fork(after_in_child=_HEART._reset)


class HeartbeatTimer:
    """Calls ``beat`` every ``interval`` seconds while the block runs (shared thread);
    the first call after ``first`` seconds (default: ``interval``). A block that ends
    before then costs two dict operations (see ``_Heart``)."""

    def __init__(
        self, interval: float | None, beat: Callable[[], object], *, first: float | None = None
    ) -> None:
        self._interval = interval
        self._first = interval if first is None else first
        self._beat = beat
        self._ident: int | None = None

    def __enter__(self) -> HeartbeatTimer:
        if self._interval:
            self._ident = _HEART.add(self._first or self._interval, self._interval, self._beat)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ident is not None:
            _HEART.remove(self._ident)


def heartbeat_interval(heartbeat_seconds: float | None) -> float:
    """Beat three times per allowed silence, and at least every 5 s so reconciliation and
    observers always see life."""
    if heartbeat_seconds:
        return max(min(heartbeat_seconds / 3.0, 5.0), 0.05)
    return 5.0


# ---------------------------------------------------------------- the payload runner


def _emit(envelope: Envelope, events: list[frames.WireEvent]) -> None:
    """Send non-terminal events (task_started, a heartbeat and the log frames before it)
    if the caller takes them within a few seconds; a later event supersedes them, so they
    are never queued or retried long."""
    try:
        sender.try_post(
            envelope.return_path, envelope.key_id, events, budget=sender.HEARTBEAT_BUDGET
        )
    except sender.UnknownRunError:
        pass  # nobody follows the run there: only its terminal event matters (the ledger)
    except PayloadError as exc:
        print(f"wove-adapters worker: an event was refused: {exc}", file=sys.stderr)


def _refuse(exc: PayloadError) -> Outcome:
    """A payload that does not verify is refused here and reported only through the
    backend's own job status (exit code 2, a job result or failure of "refused"): nothing
    in it can be trusted, so nothing is signed for it and nothing is sent to the address
    it names (a broker writer could otherwise fail live runs, harvest signed events, or
    point workers at any URL). The caller turns the job's state into a PayloadError."""
    print(f"wove-adapters worker: payload refused: {exc}", file=sys.stderr)
    return Outcome(RunState.REFUSED, error=exc, delivered=True)


def run(payload: str | bytes, *, handle_sigterm: bool = True) -> Outcome:
    """Run one payload to completion from sync code; see the module docstring."""
    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError as exc:
        return _refuse(exc)
    return run_envelope(envelope, handle_sigterm=handle_sigterm)


# A task that ends within this many seconds sends only its terminal event: one request
# per short task instead of two. Longer tasks report task_started at this point.
STARTED_AFTER = 0.05


class _Pulse:
    """What a task that outlives its short-task window sends: at its first tick
    ``on_started`` (the caller's task_started; a backend may also record its own
    STARTED state with ``on_first``), then ``on_beat`` at the policy's interval.

    ``close`` (the task has ended) stops it for good, so nothing it sends can be
    ordered after the terminal event by the worker itself: ``on_first`` runs under the
    same lock ``close`` takes, so it either ran before ``close`` returned, or never
    will (a backend's final state written after ``close`` is the last one)."""

    def __init__(
        self,
        every: float,
        on_started: Callable[[], object],
        on_beat: Callable[[], object],
        on_first: Callable[[], object] | None = None,
    ) -> None:
        self.every = every
        self.on_started = on_started
        self.on_beat = on_beat
        self.on_first = on_first
        self.started = False
        self.closed = False
        self._lock = threading.Lock()

    def beat(self) -> float | None:
        with self._lock:
            if self.closed:
                return None
            first = not self.started
            if first:
                self.started = True
                if self.on_first is not None:
                    self.on_first()
        (self.on_started if first else self.on_beat)()
        return self.every

    def close(self) -> bool:
        """Stop; True if the task was reported started (``on_first`` ran)."""
        with self._lock:
            self.closed = True
            return self.started


class _Events:
    """task_started and heartbeats of payload runs leave from a thread of their own: a
    caller slow to answer one (up to ``HEARTBEAT_BUDGET``) must not hold up the heartbeat
    thread, which also calls the next task's ``on_started`` (a Celery STARTED write) on
    time. One event per run at a time: while one waits, that run's next beat is skipped
    (a later beat says the same), so nothing piles up behind a silent caller."""

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = 0

    def sender(
        self, envelope: Envelope, capture: tasklogs.Capture | None = None
    ) -> Callable[[frames.WireEvent], None]:
        last: list[concurrent.futures.Future[None]] = []

        def send(event: frames.WireEvent) -> None:
            if last and not last[0].done():
                return
            if self._pool is None or self._pid != os.getpid():  # first use in this process
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="wove-events"
                )
                self._pid = os.getpid()
            events: list[frames.WireEvent] = [event]
            if capture is not None:  # the run's records so far go with it
                events[:0] = capture.take()
            last[:] = [self._pool.submit(_emit, envelope, events)]

        return send


_EVENTS = _Events()


def _envelope_pulse(
    envelope: Envelope,
    ident: dict[str, Any],
    on_started: Callable[[], object] | None,
    capture: tasklogs.Capture | None = None,
) -> _Pulse:
    send = _EVENTS.sender(envelope, capture)
    return _Pulse(
        heartbeat_interval(envelope.heartbeat_seconds),
        lambda: send(frames.TaskStarted(**ident, pid=os.getpid(), host=socket.gethostname())),
        lambda: send(frames.Heartbeat(**ident)),
        on_first=on_started,
    )


def run_envelope(
    envelope: Envelope,
    *,
    handle_sigterm: bool = True,
    on_started: Callable[[], object] | None = None,
) -> Outcome:
    """Run a verified envelope's task and hand its terminal event back (see
    ``deliver_terminal``): returns as soon as the caller has it or the outbox owns it.

    A task that ends within ``STARTED_AFTER`` costs no timer thread wake-up, no signal
    handler swap and no event but its terminal one. One that runs longer sends
    task_started and heartbeats, and calls ``on_started`` (from the heartbeat thread,
    never after this returns: a backend records its STARTED state there). ``started``
    on the outcome says whether it did."""
    outcome = execute(envelope, handle_sigterm=handle_sigterm, on_started=on_started)
    assert outcome.event is not None
    deliver_terminal(envelope, outcome.event, outcome)
    return outcome


def execute(
    envelope: Envelope,
    *,
    handle_sigterm: bool = True,
    on_started: Callable[[], object] | None = None,
) -> Outcome:
    """``run_envelope`` up to its terminal event, which is ``Outcome.event``, not yet
    sent (``run_envelope`` sends it; a chunk sends its runs' events together)."""
    ident: dict[str, Any] = {
        "run_id": envelope.run_id,
        "task_id": envelope.task_id,
        "attempt": envelope.attempt,
    }
    final = envelope.outcome_ident  # terminal events carry the run's key too
    outcome: Outcome
    event: frames.WireEvent
    capture = tasklogs.for_run(
        ident, envelope.delivery.get("task_logs"), envelope.delivery.get("task_output")
    )
    pulse = _envelope_pulse(envelope, ident, on_started, capture)
    traced = task_span(envelope.trace, envelope.run_id, envelope.task_id, envelope.attempt,
                       envelope.adapter)
    began: float | None = None
    with HeartbeatTimer(pulse.every, pulse.beat, first=STARTED_AFTER), traced as span_ended, \
            tasklogs.capturing(capture):
        try:
            func, args = load_task(envelope)
            began = time.perf_counter()
            if handle_sigterm:
                with sigterm_cancels():
                    value = call_task(func, args)
            else:
                value = call_task(func, args)
            elapsed = time.perf_counter() - began
            event = result_event(envelope, final, payload_mod.dumps(value), elapsed)
            outcome = Outcome(RunState.SUCCEEDED, value=value)
        except TaskCancelled as exc:
            event = frames.TaskCancelled(**final, reason=str(exc))
            outcome = Outcome(RunState.CANCELLED, error=exc)
        except PayloadError as exc:
            event = frames.TaskError(
                **final, error=frames.normalize_exception(exc, source="payload")
            )
            outcome = Outcome(RunState.REFUSED, error=exc)
        except WorkerImportError as exc:
            event = error_event(envelope, final, exc, source="worker")
            outcome = Outcome(RunState.FAILED, error=exc)
        except BaseException as exc:
            # Whatever the task raises is its outcome, SystemExit and KeyboardInterrupt
            # included (also from unpickling it or pickling its result), as in
            # ProcessPoolExecutor: the worker reports it and lives on, instead of ending
            # with no outcome for the caller to wait on.
            _drop_own_frames(exc)
            event = error_event(envelope, final, exc, source="task",
                                elapsed=None if began is None else time.perf_counter() - began)
            outcome = Outcome(RunState.FAILED, error=exc)
        span_ended(outcome.state.value, outcome.error)
    outcome.started = pulse.close()
    outcome.event = event
    outcome.key_id = envelope.key_id
    if capture is not None:
        outcome.logs = capture.finish()
    return outcome


# ---------------------------------------------------------------- the worker's span


def _no_span(outcome: str, error: BaseException | None) -> None:
    pass


_UNTRACED: AbstractContextManager[Callable[[str, BaseException | None], None]] = (
    nullcontext(_no_span)
)
@functools.cache
def _tracing() -> Any:
    """``wove_adapters.observability.tracing``, imported the first time a traced payload
    runs; None on a worker without opentelemetry-api (looked for once)."""
    try:
        from wove_adapters.observability import tracing
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            raise
        return None
    return tracing


def task_span(
    trace: dict[str, str] | None, run_id: str, task_id: str, attempt: int, executor: str
) -> AbstractContextManager[Callable[[str, BaseException | None], None]]:
    """The worker's child span of the caller's attempt span (see
    ``wove_adapters.observability.tracing``), current while the task runs; it yields
    the function that records the outcome. A payload without trace context, or a worker
    without opentelemetry-api, costs one test and imports nothing."""
    spans = _tracing() if trace else None
    if spans is None:
        return _UNTRACED
    return spans.task_span(
        trace, run_id=run_id, task_id=task_id, attempt=attempt, executor=executor
    )


# A result (or pickled exception) above this many bytes goes to the store the payload
# names (``Envelope.result_store``: the caller's payload_store, else its default store)
# and the terminal event carries a reference with its sha256 instead. The way back is
# limited (the receiver takes 16 MiB per request, callback_max_body; the drop box 64 MiB
# per entry, see docs/security.md, "Limits") and an event is held in memory while it is
# retried; below this, inline saves a store round trip. Well under both limits, so a
# batch of events with a result just below it still fits.
RESULT_INLINE_LIMIT = 4 * 1024 * 1024


def result_event(
    envelope: Envelope, final: dict[str, Any], data: bytes, elapsed: float | None = None
) -> frames.TaskResult:
    """The task_result for pickled ``data``: inline, or by reference when large."""
    ref = by_reference(envelope, data, "result")
    if ref is None:
        return frames.TaskResult(**final, result=data, elapsed=elapsed)
    return frames.TaskResult(**final, result=BY_REFERENCE, result_ref=ref)


def error_event(
    envelope: Envelope, final: dict[str, Any], exc: BaseException, *, source: str,
    elapsed: float | None = None,
) -> frames.TaskError:
    """The task_error for ``exc``, its pickle inline or by reference when large."""
    pickled = pickled_exception(exc)
    ref = None if pickled is None else by_reference(envelope, pickled, "exception")
    return frames.TaskError(
        **final,
        error=frames.normalize_exception(exc, source=source),
        exception=None if ref is not None else pickled,
        exception_ref=ref,
        elapsed=elapsed,
    )


def by_reference(envelope: Envelope, data: bytes, what: str) -> stores.BodyRef | None:
    """Put ``data`` in the payload's result store if it is above RESULT_INLINE_LIMIT and
    this worker may use that store; None: send it inline (as a caller that names no store
    expects). A store that fails is said on stderr and the bytes go inline, as they did
    before results went by reference (the receiver may then refuse them: the ledger)."""
    if len(data) <= RESULT_INLINE_LIMIT or not envelope.result_store:
        return None
    if envelope.result_store_host and envelope.result_store_host != socket.gethostname():
        return None  # the caller's default store is a directory on its own host
    # A key of its own per write: a redelivered job never overwrites the bytes another
    # worker's event names.
    base = payload_mod.store_key(envelope.run_id, envelope.attempt)
    key = f"{base}.{what}.{os.urandom(6).hex()}"
    try:
        return stores.open_store(envelope.result_store).put(key, data)
    except Exception as exc:
        print(
            f"wove-adapters worker: could not put the {what} of run {envelope.run_id} "
            f"({len(data)} bytes) in {redact_url(envelope.result_store)}: "
            f"{type(exc).__name__}: {exc}; sending it inline",
            file=sys.stderr,
        )
        return None


def _drop_own_frames(exc: BaseException) -> None:
    """The remote traceback starts at the task's code: the runner's own frames (this
    module: run_envelope, call_task) say nothing to the reader."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    exc.__traceback__ = tb


def load_task(envelope: Envelope) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Unpickle the task; a module (or a name in it) this worker cannot import becomes a
    WorkerImportError that says where it happened and what to do."""
    try:
        return payload_mod.load_body(envelope)
    except ImportError as exc:
        raise worker_import_error(envelope, exc) from exc
    except AttributeError as exc:  # pickle: "Can't get attribute 'f' on <module ...>"
        if "Can't get attribute" not in str(exc):
            raise
        raise worker_import_error(envelope, exc) from exc


_IMPORT_HINTS = {
    "dask": "; a `dask worker` imports what its PYTHONPATH (or installed packages) holds: "
    "start it with PYTHONPATH set, `--preload MODULE`, or send a single file with "
    "Client.upload_file(path)",
    "ray": "; or ship the code with the job: ray.init(runtime_env={'py_modules': [...]}) "
    "or {'working_dir': ...}",
    "process": "; worker processes get the caller's environment variables, not its "
    "sys.path: set PYTHONPATH, or executor_config env: {PYTHONPATH: ...}",
    "celery": "; a Celery worker imports from its working directory and PYTHONPATH",
    "rq": "; an RQ worker imports from its working directory and PYTHONPATH",
    "slurm": "; batch jobs get the environment sbatch passes on: export PYTHONPATH there",
    "kubernetes_jobs": "; build the module into the job's image",
    "aws_batch": "; build the module into the job definition's image",
}


def worker_import_error(envelope: Envelope, exc: BaseException) -> WorkerImportError:
    host, pid = socket.gethostname(), os.getpid()
    module = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if module is None and isinstance(exc, AttributeError):
        found = re.search(r"on <module '([^']+)'", str(exc))
        module = found.group(1) if found else None
    what = f"module '{module}'" if module else "a module"
    backend = envelope.adapter or "wove-adapters"
    top = module.split(".")[0] if module else "the module"
    return WorkerImportError(
        f"The {backend} worker on host {host} (pid {pid}) could not import {what} that task "
        f"'{envelope.task_id}' needs (run {envelope.run_id}): {type(exc).__name__}: {exc}. "
        f"The code exists where the task was submitted but not where it runs: install "
        f"{top} on the workers (pip install ...), or add the directory that holds it to the "
        f"worker's PYTHONPATH{_IMPORT_HINTS.get(backend, '')}.",
        backend=backend,
        host=host,
        pid=pid,
        module=module,
    )


def deliver_terminal(
    envelope: Envelope, event: frames.WireEvent, outcome: Outcome | None = None
) -> bool:
    """Hand the terminal event back without holding the worker slot for a caller that
    does not answer: see ``deliver_terminals``, of which this is the one-run case."""
    return deliver_terminals([(envelope, event, outcome)])


# A run's envelope, its terminal event, and the outcome that event belongs to (if any).
Terminal = tuple[Envelope, frames.WireEvent, "Outcome | None"]


def deliver_terminals(items: list[Terminal]) -> bool:
    """Send terminal events (one inline try) and wait at most ``sender.ACK_GRACE`` for
    the caller's acknowledgement.

    - Acknowledged in time: the caller has them; nothing is recorded anywhere.
    - Not acknowledged in time (the caller is slow, paused, down or gone): each outcome
      is recorded in its run's ledger before this returns (and ``outcome.pending`` tells
      the backend's entry point to record it in the backend's own state as well), so the
      worker slot is free before the acknowledgement and a worker killed from here on
      loses nothing. The process's outbox (``worker.sender``) goes on delivering in
      the background: it reads the answer still on its way, or retries.
    - Refused for good: recorded in the ledger, if any.

    A ``detach`` run is recorded first, whatever happens to the caller. The events for
    one destination go as one signed batch (a chunk's). Returns False only when some
    outcome is known lost (no caller, no ledger)."""
    groups: dict[tuple[payload_mod.ReturnPath, str], list[Terminal]] = {}
    for item in items:
        groups.setdefault((item[0].return_path, item[0].key_id), []).append(item)
    return all([_deliver_group(path, key_id, group) for (path, key_id), group in groups.items()])


def _deliver_group(
    return_path: payload_mod.ReturnPath, key_id: str, group: list[Terminal]
) -> bool:
    recorded = [
        bool(envelope.delivery.get("delivery_orphan_policy") == "detach" and envelope.ledger
             and _record_in_ledger(envelope, event))
        for envelope, event, _ in group
    ]
    events = _batch_events(group)
    try:
        sent = sender.try_first(return_path, key_id, events, sender.ACK_GRACE)
        if sent is True:
            return True
        why = "the caller did not answer in time"
    except PayloadError as exc:  # refused for good: the ledger is the only way left
        # An unknown-run answer names the runs nobody follows; the others were routed.
        unknown = set(exc.run_ids) if isinstance(exc, sender.UnknownRunError) else None
        safe = True
        for (envelope, event, outcome), done in zip(group, recorded, strict=True):
            if unknown is not None and envelope.run_id not in unknown:
                continue
            delivered = done or bool(envelope.ledger and _record_in_ledger(envelope, event))
            if unknown is None or not delivered:
                print(
                    f"wove-adapters worker: the caller refused the outcome of run "
                    f"{envelope.run_id}: {exc}"
                    + ("; recorded in the ledger" if delivered else "; no ledger holds it"),
                    file=sys.stderr,
                )
            if outcome is not None:
                outcome.delivered = delivered
            safe = safe and delivered
        return safe
    first = group[0][0]
    unrecorded = [(envelope, event) for (envelope, event, _), done
                  in zip(group, recorded, strict=True) if not done]
    fallback = None
    if unrecorded and all(envelope.ledger for envelope, _ in unrecorded):
        fallback = functools.partial(_record_all, unrecorded)
    label = f"run {first.run_id}" if len(group) == 1 else f"{len(group)} runs of a chunk"
    item = sender.Pending(
        return_path,
        key_id,
        events,
        label=f"{label} ({why})",
        retry_seconds=_bound(first.retry_seconds, sender.RETRY_SECONDS),
        retry_attempts=int(_bound(first.retry_attempts, sender.RETRY_ATTEMPTS)),
        exit_flush_seconds=_bound(first.exit_flush_seconds, sender.EXIT_FLUSH_SECONDS),
        fallback=fallback,
        recorded=not unrecorded,
        inflight=sent or None,  # sent, its answer still on the way: the outbox reads it
    )
    if not unrecorded:
        item.safe.set()
    sender.OUTBOX.put(item)
    # Recorded before the slot is freed: the outbox would record it only later, from
    # another thread, and a worker killed meanwhile would lose it.
    sender.OUTBOX.record(item)
    for _, _, outcome in group:
        if outcome is not None:
            outcome.pending = item
    return True


def _batch_events(group: list[Terminal]) -> list[frames.WireEvent]:
    """The group's terminal events, each run's log frames (if any) just ahead of its own."""
    events: list[frames.WireEvent] = []
    for _, event, outcome in group:
        if outcome is not None and outcome.logs:
            events.extend(outcome.logs)
        events.append(event)
    return events


def _record_all(items: list[tuple[Envelope, frames.WireEvent]]) -> bool:
    return all([_record_in_ledger(envelope, event) for envelope, event in items])


def _bound(value: float | None, default: float) -> float:
    return default if value is None else float(value)




def _record_in_ledger(envelope: Envelope, event: frames.WireEvent) -> bool:
    """Record the signed terminal event in the run's (shareable) ledger; first writer
    wins, so a run that already has its outcome there counts as recorded."""
    from wove_adapters.core.ledger import RunRecord, record_outcome_sync
    from wove_adapters.core.signing import encode_blob

    blob = sign_events([event], envelope.key_id)
    kind = type(event).__struct_config__.tag
    # A run id the caller handed out is a promise: if its record is missing (the claim
    # never reached the ledger), the worker creates it rather than drop the outcome.
    template = RunRecord(
        run_id=envelope.run_id,
        environment=envelope.environment or envelope.adapter,
        task_id=envelope.task_id,
        adapter=envelope.adapter,
        attempt=envelope.attempt,
    )
    try:
        record_outcome_sync(
            ledger_url_for_worker(envelope.ledger) or "",
            envelope.run_id,
            RunState.of_event(str(kind)).value,
            encode_blob(blob),
            create=template,
        )
        return True
    except Exception as exc:
        print(
            f"wove-adapters worker: could not record the outcome of run {envelope.run_id} "
            f"in the ledger: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return False


async def arun(payload: str | bytes) -> Outcome:
    """Run a payload from async code: the task runs in a thread so it never blocks the
    caller's loop (ARQ and Taskiq workers serve many jobs on one loop)."""
    import asyncio

    return await asyncio.to_thread(run, payload, handle_sigterm=False)


# ---------------------------------------------------------------- python -m wove_adapters.worker


def read_payload(argv: list[str]) -> str:
    """From ``--payload-file PATH``, ``--payload-env VAR``, ``--payload-ref URL#KEY``,
    ``-`` (stdin), or the default env var ``WOVE_PAYLOAD``."""
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            # Not argparse's 2: that code says "payload refused" to the caller.
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    parser = _Parser(prog="python -m wove_adapters.worker")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--payload-file")
    source.add_argument("--payload-env")
    source.add_argument("--payload-ref", help="STORE_URL#KEY: the payload text in a store")
    source.add_argument("payload", nargs="?", help="'-' for stdin")
    options = parser.parse_args(argv)
    if options.payload_file:
        with open(options.payload_file) as handle:
            return handle.read()
    if options.payload_ref:
        url, _, key = options.payload_ref.rpartition("#")
        store = stores.open_store(url)
        return store._get(key).decode()
    if options.payload == "-":
        return sys.stdin.read()
    if options.payload:
        return str(options.payload)
    var = options.payload_env or "WOVE_PAYLOAD"
    value = os.environ.get(var)
    if not value:
        parser.error(f"no payload: ${var} is empty and no --payload-file/--payload-ref given")
    return value


def main(argv: list[str] | None = None) -> int:
    text = read_payload(list(sys.argv[1:] if argv is None else argv))
    outcome = run(text)
    # This process ends now: deliver or record first. A receiver that is down may come
    # back (a caller restarting its receiver), so give it exit_flush_seconds even then.
    outcome.settle(linger=True, refused_too=True)
    sender.close_connections()
    return outcome.exit_code
