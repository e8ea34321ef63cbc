"""``python -m wove_adapters.stdio_worker``: a JSON-lines worker process for ``stdio``.

Reads command frames (``run_task``, ``cancel_task``, ``shutdown``) one per line on stdin
and writes event frames one per line on the pipe the pool passes in
``WOVE_ADAPTERS_STDIO_EVENTS_FD``, so task code's own prints go to stdout as usual and can
never corrupt the protocol (started without it, events go to stdout and prints to
stderr). It runs one task at a time in the main thread, so a
``cancel_task`` (or SIGTERM) really interrupts it, sleeps included; heartbeats come from a
timer thread while the task runs. When stdin closes (the parent died) it exits.

Whatever the task raises is its outcome, ``BaseException`` included, as in
``ProcessPoolExecutor``: ``SystemExit`` or ``KeyboardInterrupt`` raised by task code (or
while unpickling its callable or pickling its result) goes back to the caller as that
exception, and the worker lives on to serve the next task. Only a cancel ends a task as
cancelled. SIGINT is ignored: Ctrl-C in a terminal reaches the whole process group, and it
is the caller's to handle (it cancels or abandons its runs), not every idle worker's.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import signal
import sys
import threading
from types import FrameType
from typing import Any, BinaryIO

import msgspec

from wove_adapters.core import frames
from wove_adapters.core.codec import pickled_exception
from wove_adapters.core.envelope import dumps, loads
from wove_adapters.core.executors.stdio import EVENTS_FD_ENV
from wove_adapters.worker.runner import (
    HeartbeatTimer,
    TaskCancelled,
    call_task,
    heartbeat_interval,
)

_decoder = msgspec.json.Decoder(frames.WireCommand)
_encoder = msgspec.json.Encoder()


class StdioWorker:
    def __init__(self, commands: BinaryIO, events: BinaryIO) -> None:
        self._commands = commands
        self._events = events
        self._write_lock = threading.Lock()
        self._queue: queue.Queue[frames.RunTaskWire | None] = queue.Queue()
        self._current: str | None = None
        self._current_lock = threading.RLock()

    def emit(self, event: frames.WireEvent) -> None:
        line = _encoder.encode(event) + b"\n"
        with self._write_lock:
            self._events.write(line)
            self._events.flush()

    def _read(self) -> None:
        for raw in self._commands:
            try:
                command = _decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                print(f"stdio worker: bad frame ignored: {exc}", file=sys.stderr)
                continue
            if isinstance(command, frames.RunTaskWire):
                self._queue.put(command)
            elif isinstance(command, frames.CancelTaskWire):
                with self._current_lock:
                    if self._current == command.run_id:
                        os.kill(os.getpid(), signal.SIGUSR1)
            else:
                break
        self._queue.put(None)
        with self._current_lock:
            if self._current is not None:
                os.kill(os.getpid(), signal.SIGUSR1)

    def serve(self) -> None:
        def _cancel(signum: int, frame: FrameType | None) -> None:
            with self._current_lock:
                running = self._current is not None
            if running:
                raise TaskCancelled(f"cancelled (signal {signum})")

        signal.signal(signal.SIGUSR1, _cancel)
        signal.signal(signal.SIGTERM, _cancel)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        threading.Thread(target=self._read, daemon=True, name="stdio-reader").start()
        while True:
            command = self._queue.get()
            if command is None:
                return
            self._run(command)

    def _run(self, command: frames.RunTaskWire) -> None:
        ident: dict[str, Any] = {
            "run_id": command.run_id,
            "task_id": command.task_id,
            "attempt": command.attempt,
        }
        event: frames.WireEvent
        try:
            with self._current_lock:
                self._current = command.run_id
            self.emit(frames.TaskStarted(**ident, pid=os.getpid()))
            with HeartbeatTimer(
                heartbeat_interval(command.heartbeat_seconds),
                lambda: self.emit(frames.Heartbeat(**ident)),
            ):
                func, args = loads(command.body)
                value = call_task(func, args)
                with self._current_lock:
                    self._current = None
            event = frames.TaskResult(**ident, result=dumps(value))
        except TaskCancelled as exc:
            event = frames.TaskCancelled(**ident, reason=str(exc))
        except BaseException as exc:  # SystemExit too: the task's outcome, see above
            _drop_own_frames(exc)
            event = frames.TaskError(
                **ident,
                error=frames.normalize_exception(exc),
                exception=pickled_exception(exc),
            )
        finally:
            with self._current_lock:
                self._current = None
        self.emit(event)


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
