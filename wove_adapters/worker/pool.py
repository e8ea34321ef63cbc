"""One warm process pool for payloads a worker must not run on its own event loop.

Taskiq, ARQ (``isolation="process"``) and Temporal workers all run each payload in a
process of its own, so a sync task cannot stall the worker's loop and a running task can
really be stopped. They share this pool:

- **A zygote.** One small process per pool imports ``wove_adapters`` (and ``preload``)
  once, then forks payload processes: a start costs milliseconds, no payload process
  inherits the worker's threads, and nothing re-runs the worker's ``__main__``
  (multiprocessing's forkserver would). A fresh process per payload, or (``reuse``) one
  that serves payload after payload, as Taskiq's warm children did. The zygote reaps
  its children and tells the pool how each one ended (exit code or signal).
- **A framed pipe.** Each payload has its own Unix socket to the zygote: 4-byte length +
  msgpack frames (request, ``{pid}``, ``{report}``, or the zygote's ``{exit}``). Task code's
  prints go to the worker's stderr, never into the protocol.
- **Slots.** ``size`` payloads at once (None: as many as the backend hands over); the
  rest wait in order, and a cancel of a waiting payload means it never starts.
- **Stopping.** ``cancel()`` sends SIGTERM (the runner turns it into ``task_cancelled``),
  then SIGKILL after ``kill_after`` seconds.
- **Dying with the worker.** ``PR_SET_PDEATHSIG`` on Linux chains worker -> zygote ->
  payload process (a watcher thread elsewhere); the zygote also exits when its stdin
  (held by the worker) closes.

A payload process answers with a report (the runner's state, exit code, whether the
outcome was delivered, and, for runs with an idempotency key or when asked, the signed
terminal event) and then stays only until its outcome is delivered or recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

# What every payload process needs, imported once in the zygote instead of once per
# payload (profiled on Temporal: cloudpickle and the idna codec getaddrinfo pulls in were
# about half of a trivial task's CPU when each task imported them).
PRELOAD = ("wove_adapters.worker.runner", "cloudpickle", "encodings.idna")
SYS_PATH_ENV = "WOVE_ADAPTERS_ZYGOTE_SYS_PATH"
_ZYGOTE_CODE = "from wove_adapters.worker.pool import zygote_main; zygote_main()"


# ==================================================================== both sides


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when ``parent`` dies, so a killed worker takes its payloads
    with it instead of leaving them running unseen: ``PR_SET_PDEATHSIG`` on Linux, a
    watcher thread elsewhere. Exits at once if ``parent`` is already gone."""
    parent = os.getppid() if parent is None else parent
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0
    if os.getppid() != parent:
        os._exit(1)
    if not armed:

        def _watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=_watch, daemon=True, name="wove-parent-watch").start()


def _frame(message: dict[str, Any]) -> bytes:
    data = msgspec.msgpack.encode(message)
    return len(data).to_bytes(4, "big") + data


def _read_frame_sync(stream: Any) -> dict[str, Any] | None:
    """The next frame, or None at EOF (the pool is done with this process)."""
    header = stream.read(4)
    if len(header) < 4:
        return None
    value = msgspec.msgpack.decode(stream.read(int.from_bytes(header, "big")))
    return value if isinstance(value, dict) else {}


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    try:
        size = int.from_bytes(await reader.readexactly(4), "big")
        value = msgspec.msgpack.decode(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError, msgspec.DecodeError):
        return None
    return value if isinstance(value, dict) else None


# ==================================================================== the payload process


def run_payload(
    payload: str, *, keep_outcome: bool | None = None, handle_sigterm: bool = True,
    together: bool = False,
) -> dict[str, Any]:
    """Run one payload here and say how it went: ``{state, exit_code, delivered, run_id,
    task_id, attempt, outcome}``. ``outcome`` is the signed terminal event (bytes) when
    ``keep_outcome`` is true, or when it is None and the run has an idempotency key (a
    backend keeps it for another caller that holds the same key).

    ``together``: this process runs several payloads at once in threads (ARQ's
    ``isolation="thread"``): the terminal event goes back with those of the runs that
    end meanwhile, in one request (``TERMINALS``). It returns, as alone, once the caller
    has it or its outcome is recorded."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError
    from wove_adapters.worker import runner as worker

    if payload_mod.is_chunk(payload):
        return _run_chunk(payload, handle_sigterm=handle_sigterm)
    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        refused = worker.run(payload, handle_sigterm=handle_sigterm)  # refused: state only
        return {"state": refused.state.value, "exit_code": refused.exit_code, "delivered": True}
    if together:
        outcome = worker.execute(envelope, handle_sigterm=handle_sigterm)
        assert outcome.event is not None
        TERMINALS.deliver((envelope, outcome.event, outcome))
    else:
        outcome = worker.run_envelope(envelope, handle_sigterm=handle_sigterm)
    report: dict[str, Any] = {
        "state": outcome.state.value,
        "exit_code": outcome.exit_code,
        "delivered": outcome.delivered,
        "run_id": envelope.run_id,
        "task_id": envelope.task_id,
        "attempt": envelope.attempt,
    }
    keyed = envelope.delivery.get("delivery_idempotency_key") is not None
    # Also when the caller did not acknowledge it within the grace: the backend then
    # keeps it in its own record of the job (the runner put it in the ledger too).
    if keep_outcome or (keep_outcome is None and (keyed or outcome.pending is not None)):
        report["outcome"] = outcome.signed()
    return report


class _Slot:
    """One run's terminal event waiting in ``Terminals``."""

    __slots__ = ("error", "item", "lead", "size", "wake")

    def __init__(self, item: Any, size: int) -> None:
        self.item = item
        self.size = size
        self.wake = threading.Event()
        self.lead = False  # this run's thread sends the next batch
        self.error: BaseException | None = None


class Terminals:
    """Terminal events of payloads that run in threads of one process, sent back as one
    signed batch per caller (group commit), each run's thread returning once its own
    event is acknowledged or its outcome recorded (``runner.deliver_terminals``: the
    slot-before-ack rules are the single run's).

    Sent one request per run, the events of a burst queued on the process's one
    connection to the caller: each waited its turn (a thread hop, a GIL hand-off and a
    request each), and those that waited past ``sender.ACK_GRACE`` were recorded in the
    ledger and sent again by the outbox (profiled on an ARQ worker serving 100 jobs at
    once: the way back was the larger part of its CPU). Here the thread whose event
    finds no batch on its way sends every event queued by then; the threads that queue
    while it sends wait, and the first of them sends theirs next. A run alone costs
    nothing more than before: its batch is itself."""

    MAX_EVENTS = 64  # as a chunk's batches (worker.chunks)
    MAX_BYTES = 4 * 1024 * 1024  # well under the receiver's request limit

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: deque[_Slot] = deque()
        self._sending = False

    def deliver(self, item: Any) -> None:
        """Hand one ``runner.Terminal`` back; returns when it is delivered or recorded
        (see ``runner.deliver_terminals``; its outcome says which)."""
        slot = _Slot(item, _size_of(item))
        with self._lock:
            self._queued.append(slot)
            if not self._sending:
                self._sending = slot.lead = True
        if not slot.lead:
            slot.wake.wait()
            if not slot.lead:  # another thread sent it
                if slot.error is not None:
                    raise slot.error
                return
        self._send(slot)

    def _send(self, own: _Slot) -> None:
        from wove_adapters.worker import runner

        with self._lock:
            batch = [self._queued.popleft()]
            size = batch[0].size
            while (self._queued and len(batch) < self.MAX_EVENTS
                   and size + self._queued[0].size <= self.MAX_BYTES):
                size += self._queued[0].size
                batch.append(self._queued.popleft())
        error: BaseException | None = None
        try:
            runner.deliver_terminals([slot.item for slot in batch])
        except BaseException as exc:  # every run of the batch hears it
            error = exc
        with self._lock:
            following = self._queued[0] if self._queued else None
            if following is None:
                self._sending = False
            else:
                following.lead = True
        for slot in batch:
            if slot is not own:
                slot.error = error
                slot.wake.set()
        if following is not None:
            following.wake.set()
        if error is not None:
            raise error


TERMINALS = Terminals()


def _size_of(item: Any) -> int:
    """About how many bytes a terminal event adds to a batch: its result or pickled
    exception, and its run's captured log frames (which ride ahead of it)."""
    _, event, outcome = item
    size = len(getattr(event, "result", None) or getattr(event, "exception", None) or b"")
    for log in getattr(outcome, "logs", None) or ():
        size += len(log.message) + len(log.exc_text)
    return size


def _run_chunk(payload: str, *, handle_sigterm: bool) -> dict[str, Any]:
    """A chunk (``worker.chunks``): its runs report for themselves; the report says how
    the job went (``refused`` when no piece verified)."""
    from wove_adapters.core.policies import RunState
    from wove_adapters.worker import chunks, runner

    done = chunks.run_chunk(payload, handle_sigterm=handle_sigterm)
    code = {
        RunState.REFUSED: runner.EXIT_PAYLOAD_REFUSED, RunState.CANCELLED: runner.EXIT_CANCELLED,
    }.get(done.state, runner.EXIT_OK if done.delivered else runner.EXIT_DELIVERY_FAILED)
    return {"state": done.state.value, "exit_code": code, "delivered": done.delivered}


def _payload_process(conn: Any, zygote: int) -> None:
    """In a freshly forked payload process: for each payload the pool sends (one, unless
    the pool reuses its processes), say our pid, run it (SIGTERM cancels it), report.
    Then stay until the outcomes are delivered or recorded."""
    die_with_parent(zygote)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # the zygote's stdin is the worker's lifeline, not the task's
    os.close(devnull)
    stream = conn.makefile("rwb")
    # One SIGTERM handler for the process's life (see _on_sigterm); the runner puts its
    # own in front of it for the task itself, once. Three handler swaps per payload cost
    # a reused payload process more than the rest of its bookkeeping.
    signal.signal(signal.SIGTERM, _on_sigterm)
    while True:
        request = _read_frame_sync(stream)
        if request is None:
            break
        _TAKEN[0] = True  # cancelled from here until its report: the process exits
        stream.write(_frame({"pid": os.getpid()}))
        stream.flush()
        report = run_payload(str(request.get("payload", "")), keep_outcome=request.get("keep"))
        _TAKEN[0] = False  # idle again: a cancel that comes too late for it is moot
        stream.write(_frame({"report": report}))
        stream.flush()
        if not request.get("reuse"):
            break
    # This process ends with os._exit (no exit hooks): an outcome the caller did not take
    # yet is delivered or recorded in the ledger first (the pool already has the report).
    from wove_adapters.worker import sender

    sender.OUTBOX.flush(None)


# Whether this payload process holds a payload (from its request to its report).
_TAKEN = [False]


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM in a payload process outside the task's own code (the runner turns one
    during the task into ``task_cancelled``): idle, ignored; holding a payload (before
    its task starts, or while its outcome goes back), the process ends by the signal,
    and the pool reports the payload cancelled."""
    if _TAKEN[0]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def zygote_main(argv: list[str] | None = None) -> None:
    """``python -c '...zygote_main()' SOCKET PARENT LINGER [MODULE...]``: import the
    modules, listen, fork one payload process per connection, reap them and send each
    connection its process's exit status. Stdin EOF: stop accepting, give running
    payloads ``LINGER`` seconds, exit (they die with it)."""
    import importlib
    import select
    import socket
    import traceback

    path, parent, linger, *preload = sys.argv[1:] if argv is None else argv
    sys.path[:] = json.loads(os.environ.pop(SYS_PATH_ENV, "[]")) or sys.path
    die_with_parent(int(parent))
    for module in preload:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a missing optional module only costs its import later
            print(f"wove-adapters zygote: could not preload {module}: {exc}", file=sys.stderr)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1024)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes select via wake_w
    # Ctrl-C in the worker's terminal is the worker's to handle; payloads inherit this.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    os.dup2(2, 1)  # task output goes to the worker's stderr, never into the ready pipe
    children: dict[int, socket.socket] = {}
    closing_at: float | None = None
    while True:
        watched = [wake_r] if closing_at is not None else [wake_r, listener.fileno(), 0]
        wait = None if closing_at is None else max(closing_at - time.monotonic(), 0.0)
        readable, _, _ = select.select(watched, [], [], wait)
        if wake_r in readable:
            with contextlib.suppress(OSError):
                os.read(wake_r, 4096)
            _reap(children)
        if closing_at is not None:
            if not children or time.monotonic() >= closing_at:
                os._exit(0)
            continue
        if 0 in readable and not os.read(0, 1):  # the worker closed us (or died)
            listener.close()
            closing_at = time.monotonic() + float(linger)
            if not children:
                os._exit(0)
            continue
        if listener.fileno() in readable:
            conn, _ = listener.accept()
            zygote = os.getpid()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    for fd in (wake_r, wake_w):
                        os.close(fd)
                    listener.close()
                    for other in children.values():
                        other.close()
                    _payload_process(conn, zygote)
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            children[pid] = conn


def _reap(children: dict[int, Any]) -> None:
    """Collect every payload process that ended and tell its connection how."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):  # the pool may have stopped listening
                conn.sendall(_frame({"exit": os.waitstatus_to_exitcode(status)}))
            conn.close()


# ==================================================================== the worker's side


class Zygote:
    """The zygote process of one pool (see the module docstring)."""

    def __init__(self, preload: Sequence[str], linger: float) -> None:
        self.directory = tempfile.mkdtemp(prefix="wove-pool-")
        self.path = os.path.join(self.directory, "zygote.sock")
        self.linger = linger
        environment = {**os.environ, SYS_PATH_ENV: json.dumps(sys.path)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE_CODE, self.path, str(os.getpid()), str(linger),
             *dict.fromkeys([*PRELOAD, *preload])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment,
            start_new_session=True,  # terminal signals go to the worker, not to payloads
        )
        assert self.proc.stdout is not None
        ready = self.proc.stdout.readline()  # the zygote says when it listens
        if ready.strip() != b"ready":
            self.close()
            raise RuntimeError(
                f"the wove-adapters payload zygote did not start (exit {self.proc.poll()}); "
                "its error is on this worker's stderr"
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, wait: float = 0.0) -> None:
        """Close its stdin (it stops taking payloads and lingers for running ones), wait
        up to ``wait`` seconds, then kill it."""
        with contextlib.suppress(Exception):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(Exception):
                self.proc.kill()
                self.proc.wait(5)
        with contextlib.suppress(Exception):
            if self.proc.stdout is not None:
                self.proc.stdout.close()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class ChildOutcome:
    """How one payload ended. ``report`` is what its process said (empty when it died
    first or never started); ``notice``, set when the caller has not heard of it from the
    payload itself, says what happened (``report_to_caller`` sends it)."""

    state: str  # succeeded | failed | cancelled | refused (the runner's) | lost
    pid: int | None = None
    exit_code: int | None = None  # the runner's exit code, or the process's status
    delivered: bool = True
    outcome: bytes | None = None  # the signed terminal event, when kept
    report: dict[str, Any] = field(default_factory=dict)
    notice: str | None = None


class PoolRun:
    """One payload handed to the pool: ``await`` it for its ``ChildOutcome`` (awaiting is
    shielded: a cancelled awaiter leaves the payload running; call ``cancel``)."""

    def __init__(self, pool: ProcessPool, payload: str, keep_outcome: bool | None) -> None:
        self.pool = pool
        self.payload = payload
        self.keep_outcome = keep_outcome
        self.pid: int | None = None
        self.kill_after = pool.kill_after
        self.signum: int | None = None  # the stop signal asked for, if any
        self.ended = False  # the payload process reported or exited: never signal it
        self.waiter: asyncio.Future[bool] | None = None  # set while waiting for a slot
        self.task: asyncio.Task[ChildOutcome] = asyncio.get_running_loop().create_task(
            pool._run(self)
        )

    @property
    def cancelled(self) -> bool:
        return self.signum is not None

    def cancel(self, signum: int = signal.SIGTERM, *, kill_after: float | None = None) -> None:
        """A waiting payload never starts; a running one gets ``signum`` now and SIGKILL
        ``kill_after`` seconds later (default: the pool's); a finished one is left alone."""
        if kill_after is not None:
            self.kill_after = kill_after
        first = self.signum is None
        self.signum = signum if first or signum == signal.SIGKILL else self.signum
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(False)
            return
        if self.pid is not None:
            self._signal(signum)
            if first and signum != signal.SIGKILL:
                asyncio.get_running_loop().call_later(
                    self.kill_after, self._signal, signal.SIGKILL
                )

    def _signal(self, signum: int) -> None:
        if self.pid is not None and not self.ended:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def done(self) -> bool:
        return self.task.done()

    async def wait(self, timeout: float | None = None) -> bool:
        """Whether the payload ended within ``timeout`` seconds (it runs on regardless)."""
        done, _ = await asyncio.wait({self.task}, timeout=timeout)
        return bool(done)

    def __await__(self) -> Generator[Any, None, ChildOutcome]:
        return asyncio.shield(self.task).__await__()


class ProcessPool:
    """The warm payload processes of one worker process (see the module docstring).

    ``async with ProcessPool(4) as pool: outcome = await pool.run(payload)``; ``run``
    returns a ``PoolRun`` at once (``cancel()`` it, ``await`` it). ``size``: payloads at
    once (None: no bound of our own). ``kill_after``: seconds between SIGTERM and SIGKILL.
    ``preload``: modules the payload processes import up front. ``linger``: on
    ``aclose``, seconds running payloads get to finish and settle their outcomes.
    ``reuse``: a payload process takes the next payload after reporting (the task's
    module, the signing key and the connection to the caller stay warm; module state
    carries over from one payload to the next, as in a thread or process pool); a killed
    or crashed one is replaced by a fork. Without it each payload gets a fresh process
    that exits once its outcome is delivered or recorded."""

    def __init__(
        self,
        size: int | None = None,
        *,
        kill_after: float = 10.0,
        preload: Sequence[str] = (),
        linger: float = 30.0,
        reuse: bool = False,
    ) -> None:
        self.size = size
        self.kill_after = kill_after
        self.preload = tuple(preload)
        self.linger = linger
        self._zygote: Zygote | None = None
        self._lock = threading.Lock()  # prepare() may run in any thread
        self.reuse = reuse
        self._free = size
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._idle: list[_Child] = []  # reused payload processes waiting for a payload
        self._closed = False

    # ------------------------------------------------------------ life cycle

    def prepare(self) -> Zygote:
        """Start the zygote now if it is not running (blocks while it imports; the first
        payload would start it otherwise)."""
        with self._lock:
            if self._zygote is None or not self._zygote.alive():
                if self._zygote is not None:
                    self._zygote.close()
                self._zygote = Zygote(self.preload, self.linger)
            return self._zygote

    async def start(self) -> ProcessPool:
        self._closed = False
        await asyncio.to_thread(self.prepare)
        return self

    async def __aenter__(self) -> ProcessPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Waiting payloads never start; running ones get ``linger`` seconds."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
        for child in self._idle:
            child.writer.close()  # EOF: it settles its outcomes and exits
        self._idle.clear()
        zygote, self._zygote = self._zygote, None
        if zygote is not None:
            await asyncio.to_thread(zygote.close, self.linger + 2.0)

    @property
    def zygote_pid(self) -> int | None:
        return self._zygote.pid if self._zygote is not None else None

    # ------------------------------------------------------------ payloads

    def run(self, payload: str, *, keep_outcome: bool | None = None) -> PoolRun:
        """Run ``payload`` in a payload process as soon as a slot is free."""
        return PoolRun(self, payload, keep_outcome)

    async def _run(self, run: PoolRun) -> ChildOutcome:
        if not await self._acquire(run):
            return ChildOutcome("cancelled", notice="cancelled before it started")
        try:
            return await self._execute(run)
        finally:
            self._release()

    async def _acquire(self, run: PoolRun) -> bool:
        if self._closed or run.cancelled:
            return False
        if self._free is None:
            return True
        if self._free > 0:
            self._free -= 1
            return True
        run.waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(run.waiter)
        try:
            granted = await run.waiter
        except asyncio.CancelledError:
            if run.waiter.done() and not run.waiter.cancelled() and run.waiter.result():
                self._release()
            raise
        finally:
            run.waiter = None
        return granted

    def _release(self) -> None:
        """Hand the slot to the longest waiter still waiting, else free it."""
        if self._free is None:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._free += 1

    async def _fork(self) -> _Child:
        """A new payload process: one connection to the zygote, which forks for it."""
        zygote = self._zygote
        if zygote is None or not zygote.alive():
            zygote = await asyncio.to_thread(self.prepare)
        reader, writer = await asyncio.open_unix_connection(zygote.path)
        return _Child(reader, writer)

    async def _execute(self, run: PoolRun) -> ChildOutcome:
        request = {"payload": run.payload, "keep": run.keep_outcome, "reuse": self.reuse}
        message: dict[str, Any] | None = None
        child: _Child | None = None
        for tries in (1, 2, 3):  # an idle process or zygote that died is replaced
            child = self._idle.pop() if self._idle else None
            try:
                if child is None:
                    child = await self._fork()
                child.writer.write(_frame(request))
                await child.writer.drain()
                hello = await _read_frame(child.reader)
            except (ConnectionError, OSError):
                if child is not None:
                    child.writer.close()
                if tries == 3:
                    raise
                continue
            if hello is None or "pid" not in hello:
                child.writer.close()  # it died before it took the payload: never started
                continue
            run.pid = int(hello["pid"])
            if run.signum is not None:  # cancelled while it was being handed over
                signum, run.signum = run.signum, None
                run.cancel(signum)
            try:
                message = await _read_frame(child.reader)
            except BaseException:
                run._signal(signal.SIGKILL)  # our task was cancelled: stop the payload
                child.writer.close()
                raise
            finally:
                run.ended = True
            break
        if run.pid is None or child is None:
            raise RuntimeError("the payload process could not be started (the zygote died)")
        if message is not None and isinstance(message.get("report"), dict):
            if self.reuse and not self._closed and len(self._idle) < (self.size or 1 << 30):
                self._idle.append(child)
            else:
                child.writer.close()
            report: dict[str, Any] = message["report"]
            return ChildOutcome(
                str(report.get("state", "failed")), pid=run.pid,
                exit_code=report.get("exit_code"), delivered=bool(report.get("delivered", True)),
                outcome=report.get("outcome"), report=report,
            )
        child.writer.close()
        code = message.get("exit") if message is not None else None
        how = describe_exit(code) if code is not None else "ended with its zygote"
        if run.cancelled:
            return ChildOutcome("cancelled", pid=run.pid, exit_code=code,
                                notice=f"killed after cancellation: pid {run.pid} {how}")
        return ChildOutcome("lost", pid=run.pid, exit_code=code,
                            notice=f"the payload process died: pid {run.pid} {how}")


@dataclass
class _Child:
    """The pool's end of one payload process's connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


def describe_exit(code: int) -> str:
    from wove_adapters.core.executors.stdio import describe_exit as describe

    return describe(int(code))


class LateWrites:
    """Redis writes no reader waits for, sent together: one pipeline per ``WINDOW``
    seconds (or per ``MAX`` writes) instead of a round trip each.

    What a finished job's last write records (Taskiq's final state, ARQ's job record) is
    read by a caller that has not heard the run's outcome: reconciliation, or another
    caller holding the run's idempotency key. For a run without a key whose caller has
    acknowledged its outcome, nobody does, so the job need not wait for that write, and
    the writes of a burst go as one pipeline (profiled on Taskiq and ARQ workers: a
    command on its own cost the worker's loop about as much as the rest of the job's
    bookkeeping together). Runs with a key, late acknowledgements and everything else
    still write before the job returns. A worker killed within ``WINDOW`` of such a
    run's end leaves that write undone (the run itself was delivered)."""

    WINDOW = 0.05
    MAX = 256

    def __init__(self, client: Any) -> None:
        self.client = client
        self._queued: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()

    def add(self, *command: Any) -> None:
        """Queue one command (``"SET", key, value, "EX", ttl``, ``"EVAL", ...``)."""
        self._queued.append(command)
        loop = asyncio.get_running_loop()
        if len(self._queued) >= self.MAX:
            self._send_now()
        elif self._timer is None:
            self._timer = loop.call_later(self.WINDOW, self._send_now)

    def _send_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queued, self._queued = self._queued, []
        if queued:
            task = asyncio.get_running_loop().create_task(self._send(queued))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, queued: list[tuple[Any, ...]]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for command in queued:
                    pipe.execute_command(*command)
                await pipe.execute(raise_on_error=False)
        except Exception as exc:  # Redis away: these states stay behind (see above)
            print(f"wove-adapters worker: {len(queued)} final job states not written: {exc}",
                  file=sys.stderr)

    async def aclose(self) -> None:
        """Send what is queued and wait for every pipeline in flight (worker shutdown)."""
        self._send_now()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
        _late.pop(id(self.client), None)


_late: dict[int, LateWrites] = {}


def late_writes(client: Any) -> LateWrites:
    """The one ``LateWrites`` of ``client`` in this process."""
    from wove_adapters.worker.leases import one_per_client

    return one_per_client(_late, client, LateWrites)


def acknowledged(report: dict[str, Any]) -> bool:
    """The run's caller acknowledged its outcome and nobody else will ask for it: no
    idempotency key, no late acknowledgement (either puts the signed ``outcome`` in the
    report), delivered, and succeeded or failed (the states the caller heard from the
    run itself)."""
    return ("outcome" not in report and "run_id" in report
            and bool(report.get("delivered", True))
            and report.get("state") in ("succeeded", "failed"))


async def report_to_caller(payload: str, state: str, reason: str) -> None:
    """Tell the caller what happened to a payload that did not report for itself
    (``task_cancelled`` for ``state == "cancelled"``, else ``task_lost``)."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core import frames
    from wove_adapters.worker import sender

    # A chunk's every run is told: the caller drops what it hears of runs that ended.
    pieces = payload_mod.split_chunk(payload) if payload_mod.is_chunk(payload) else [payload]
    try:
        for piece in pieces:
            envelope = await asyncio.to_thread(payload_mod.decode_payload, piece)
            ident: dict[str, Any] = {"run_id": envelope.run_id, "task_id": envelope.task_id,
                                     "attempt": envelope.attempt}
            event: frames.WireEvent = (
                frames.TaskCancelled(**envelope.outcome_ident, reason=reason)
                if state == "cancelled"
                else frames.TaskLost(**ident, reason=reason)
            )
            await asyncio.wait_for(
                sender.asend(envelope.return_path, envelope.key_id, event), 30
            )
    except Exception as exc:  # the caller's reconciliation still finds it
        print(f"wove-adapters worker: could not report a {state} run: {exc}", file=sys.stderr)
