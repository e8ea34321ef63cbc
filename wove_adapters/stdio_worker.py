"""``python -m wove_adapters.stdio_worker``: a JSON-lines worker process for ``stdio``.

Reads command frames (``run_task``, ``cancel_task``, ``shutdown``) one per line on stdin
and writes event frames one per line on the pipe the pool passes in
``WOVE_ADAPTERS_STDIO_EVENTS_FD``, so task code's own prints go to stdout as usual and can
never corrupt the protocol (started without it, events go to stdout and prints to
stderr). It runs one task at a time in the main thread, so a
``cancel_task`` (or SIGTERM) really interrupts it, sleeps included; the pool may send the
next ``run_task`` while one runs (it waits in this process, so the worker never idles
between tasks), and a ``cancel_task`` for that queued run drops it before it starts. A
task that outlives the short-task window (``runner.STARTED_AFTER``) sends task_started
and then heartbeats, from a timer thread; a shorter one sends only its outcome. When
stdin closes (the parent died) or ``shutdown`` comes, queued runs are dropped, the
running one is cancelled, and it exits.

Whatever the task raises is its outcome, ``BaseException`` included, as in
``ProcessPoolExecutor``: ``SystemExit`` or ``KeyboardInterrupt`` raised by task code (or
while unpickling its callable or pickling its result) goes back to the caller as that
exception, and the worker lives on to serve the next task. Only a cancel ends a task as
cancelled. SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and it
is the caller's to handle (it cancels or abandons its runs), not every idle worker's.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, BinaryIO

import msgspec

from wove_adapters.core import frames
from wove_adapters.core.codec import pickled_exception
from wove_adapters.core.envelope import dumps, loads
from wove_adapters.core.executors.stdio import EVENTS_FD_ENV
from wove_adapters.worker import tasklogs
from wove_adapters.worker.runner import (
    STARTED_AFTER,
    HeartbeatTimer,
    TaskCancelled,
    _Pulse,
    call_task,
    heartbeat_interval,
    task_span,
)

_decoder = msgspec.json.Decoder(frames.WireCommand)
_encoder = msgspec.json.Encoder()


class StdioWorker:
    def __init__(self, commands: BinaryIO, events: BinaryIO) -> None:
        self._commands = commands
        self._events = events
        self._write_lock = threading.Lock()
        # The task ahead (the pool sends the next run_task while one runs) and the one
        # running. ``_cond`` guards both: a cancel finds its run either still queued
        # (removed: it never starts) or taken by the main thread, never in between.
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[frames.RunTaskWire] = collections.deque()
        self._closed = False
        self._current: str | None = None  # taken by the main thread
        self._running = False  # inside _run's try: a signal may interrupt it
        self._cancelled = False  # the current run was cancelled before it started

    def emit(self, event: frames.WireEvent) -> None:
        self._write(_encoder.encode(event) + b"\n")

    def emit_after(self, logs: list[frames.Log], event: frames.WireEvent) -> None:
        """``event`` after a run's captured log frames, in one write."""
        if not logs:
            self.emit(event)
            return
        self._write(b"".join([*(_encoder.encode(log) + b"\n" for log in logs),
                              _encoder.encode(event) + b"\n"]))

    def _write(self, data: bytes) -> None:
        """A caller that is gone (it exited, or was killed) closed its end of the pipe:
        there is no one left to tell, and the command pipe's end of file stops this
        worker. Its stderr stays for what matters (a broken pipe there is noise)."""
        with self._write_lock:
            try:
                self._events.write(data)
                self._events.flush()
            except BrokenPipeError:
                # Not under ``_cond``: a thread may emit while holding it. The end of
                # file on the command pipe wakes the main thread.
                self._closed = True

    def _read(self) -> None:
        for raw in self._commands:
            try:
                command = _decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                print(f"stdio worker: bad frame ignored: {exc}", file=sys.stderr)
                continue
            if isinstance(command, frames.RunTaskWire):
                with self._cond:
                    self._queue.append(command)
                    self._cond.notify()
            elif isinstance(command, frames.CancelTaskWire):
                self._cancel(command.run_id, "removed from the worker's queue")
            else:
                break
        # shutdown, or stdin closed (the parent died): nothing queued starts any more,
        # and the running task is interrupted.
        with self._cond:
            self._closed = True
            if self._current is not None:
                self._interrupt()
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify()
        with contextlib.suppress(OSError):  # after a shutdown frame the caller still reads
            for command in queued:
                self.emit(frames.TaskCancelled(
                    run_id=command.run_id, task_id=command.task_id, attempt=command.attempt,
                    reason="the worker is shutting down",
                ))

    def _cancel(self, run_id: str, reason: str) -> None:
        """A queued run is dropped (its task_cancelled says so), the running one is
        interrupted; a run this worker no longer has has sent its terminal event."""
        dropped: frames.RunTaskWire | None = None
        with self._cond:
            for queued in self._queue:
                if queued.run_id == run_id:
                    dropped = queued
                    self._queue.remove(queued)
                    break
            else:
                if self._current == run_id:
                    self._interrupt()
        if dropped is not None:
            self.emit(frames.TaskCancelled(
                run_id=dropped.run_id, task_id=dropped.task_id, attempt=dropped.attempt,
                reason=reason,
            ))

    def _interrupt(self) -> None:
        """Cancel the current run (``_cond`` held): by signal once its task runs, by a flag
        the main thread reads before it starts the task."""
        self._cancelled = True
        if self._running:
            os.kill(os.getpid(), signal.SIGUSR1)

    def _take(self) -> frames.RunTaskWire | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed or not self._queue:
                return None
            command = self._queue.popleft()
            self._current, self._cancelled = command.run_id, False
            return command

    def serve(self) -> None:
        def _cancel(signum: int, frame: FrameType | None) -> None:
            with self._cond:
                running = self._running
            if running:
                raise TaskCancelled(f"cancelled (signal {signum})")

        signal.signal(signal.SIGUSR1, _cancel)
        signal.signal(signal.SIGTERM, _cancel)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=self._read, daemon=True, name="stdio-reader").start()
        while True:
            command = self._take()
            if command is None:
                return
            self._run(command)

    def _run(self, command: frames.RunTaskWire) -> None:
        """Run one task. task_started and heartbeats go out only once it outlives the
        short-task window (``runner.STARTED_AFTER``): a short task sends one event. A run
        with ``delivery_heartbeat_seconds`` says task_started at once: the caller's
        heartbeat window opens there, and a worker frozen in its first milliseconds
        (alive, so its pipe stays open) must still be found silent."""
        ident: dict[str, Any] = {
            "run_id": command.run_id,
            "task_id": command.task_id,
            "attempt": command.attempt,
        }
        event: frames.WireEvent
        capture = tasklogs.for_run(ident, command.task_logs, command.task_output)

        def taken() -> list[frames.Log]:  # the run's records so far go with each beat
            return [] if capture is None else capture.take()

        pulse = _Pulse(
            heartbeat_interval(command.heartbeat_seconds),
            lambda: self.emit_after(taken(), frames.TaskStarted(**ident, pid=os.getpid())),
            lambda: self.emit_after(taken(), frames.Heartbeat(**ident)),
        )
        traced = task_span(command.trace, command.run_id, command.task_id, command.attempt,
                           "stdio")
        with traced as span_ended:
            event = self._outcome(command, ident, pulse, capture, span_ended)
        pulse.close()
        self.emit_after([] if capture is None else capture.finish(), event)

    def _outcome(
        self, command: frames.RunTaskWire, ident: dict[str, Any], pulse: _Pulse,
        capture: tasklogs.Capture | None,
        span_ended: Callable[[str, BaseException | None], None],
    ) -> frames.WireEvent:
        event: frames.WireEvent
        began: float | None = None
        try:
            try:
                with self._cond:
                    if self._cancelled:
                        raise TaskCancelled("cancelled before it started")
                    self._running = True
                first = STARTED_AFTER
                if command.heartbeat_seconds:
                    pulse.beat()  # task_started now; heartbeats from the timer
                    first = pulse.every
                with HeartbeatTimer(pulse.every, pulse.beat, first=first), \
                        tasklogs.capturing(capture):
                    func, args = loads(command.body)
                    began = time.perf_counter()
                    value = call_task(func, args)
                    elapsed = time.perf_counter() - began
            finally:
                # A cancel's signal raises only while _running: once this is done,
                # nothing below can be interrupted.
                with self._cond:
                    self._running = False
                    self._current = None
            event = frames.TaskResult(**ident, result=dumps(value), elapsed=elapsed)
            span_ended("succeeded", None)
        except TaskCancelled as exc:
            event = frames.TaskCancelled(**ident, reason=str(exc))
            span_ended("cancelled", exc)
        except BaseException as exc:  # SystemExit too: the task's outcome, see above
            _drop_own_frames(exc)
            event = frames.TaskError(
                **ident,
                error=frames.normalize_exception(exc),
                exception=pickled_exception(exc),
                elapsed=None if began is None else time.perf_counter() - began,
            )
            span_ended("failed", exc)
        return event


_OWN_FILES = frozenset({__file__, call_task.__code__.co_filename})


def _drop_own_frames(exc: BaseException) -> None:
    """The remote traceback starts at the task's code: this worker's frames (``_run``,
    ``call_task``) say nothing to the reader."""
    tb = exc.__traceback__
    while (
        tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in _OWN_FILES
    ):
        tb = tb.tb_next
    exc.__traceback__ = tb


def main() -> int:
    events_fd = os.environ.pop(EVENTS_FD_ENV, None)
    if events_fd:
        # Events on their own pipe: task prints go to stdout, line by line, as the caller
        # would see them from a thread. The pipe is not handed to the task's children
        # (one holding it would hide this worker's death from the pool).
        protocol_out = os.fdopen(int(events_fd), "wb", buffering=0)
        os.set_inheritable(protocol_out.fileno(), False)
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(line_buffering=True)
    else:  # started by hand: events on stdout, so task prints must go to stderr
        protocol_out = os.fdopen(os.dup(1), "wb", buffering=0)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    try:
        StdioWorker(sys.stdin.buffer, protocol_out).serve()
    finally:
        with contextlib.suppress(OSError):  # the caller may have closed its end
            protocol_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
