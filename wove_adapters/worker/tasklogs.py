"""Task logs, the worker side: one run's ``logging`` records (and, if asked, its
stdout/stderr lines) captured as ``log`` frames that go home with the run's own events.

Why here and not in the task: a task's logging stays on whatever machine ran it, and the
person who called it is looking at the caller. With ``task_logs`` set (a level; see
docs/observability.md, "Logs") the runner wraps the run in ``capturing(for_run(...))``;
with it unset nothing here runs at all (``for_run`` returns None and ``capturing(None)``
is a shared no-op), so a run that does not ask pays one dict lookup.

What is captured, and why that way:

- Records made **in the run's own thread** (and so in the asyncio code the task awaits
  there), at or above the level, that reach the root logger or a logger that stops
  propagation (Celery's task loggers stop at ``celery.task``). Threads the task starts
  are not followed: they may outlive the run, and in a worker that runs several tasks at
  once (Celery threads, ARQ/Taskiq, Dask) nothing says which run a record of another
  thread belongs to.
- While a capture runs below the root logger's level, the root logger is lowered to it
  (else ``log.info`` is a no-op before any handler sees it) and the root's existing
  handlers get a filter that lets through exactly what they saw before; both are undone
  when the last capture in the process ends. Records of ``wove_adapters`` loggers (this
  package's own) are never captured.
- ``task_output``: ``sys.stdout`` / ``sys.stderr`` are teed (the worker's own output is
  unchanged), and each complete line written from the run's thread becomes a record of
  logger ``stdout`` (INFO) or ``stderr`` (WARNING). Writes below Python (C code, child
  processes writing to the file descriptors) are not seen.

Limits, per run: a token bucket of ``RATE`` records a second with bursts of ``BURST``;
records it refuses, and records beyond ``MAX_PENDING_BYTES`` waiting to be sent, are
dropped and counted, and the count goes home as one last "N records dropped" frame. A
message (and an exception's text) above ``MAX_MESSAGE`` bytes is truncated. Records wait
in memory until the run's next heartbeat batch or its terminal event carries them (one
request for a short task, however many records it logged); a frame never goes anywhere
before the payload that asked for it was verified.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from wove_adapters.core.frames import Log

RATE = 100.0  # records per second per run, refilled continuously
BURST = 200  # records a run may log at once before the rate applies
MAX_MESSAGE = 8 * 1024  # bytes of a message (and of an exception's text) that travel
MAX_PENDING_BYTES = 256 * 1024  # a run's records waiting for the next batch
OUTPUT_LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING}
_OWN = "wove_adapters"

_host = ""


def _hostname() -> str:
    global _host
    if not _host:
        _host = socket.gethostname()
    return _host


def _capped(text: str) -> str:
    """``text`` cut to ``MAX_MESSAGE`` bytes of UTF-8, saying how much was cut."""
    if len(text) * 4 <= MAX_MESSAGE:  # cannot be above the cap: skip the encode
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= MAX_MESSAGE:
        return text
    cut = data[:MAX_MESSAGE].decode("utf-8", "ignore")
    return f"{cut}... [{len(data) - MAX_MESSAGE} bytes cut]"


class Capture:
    """One run's records, from the moment its payload verified until its terminal event.

    ``add`` runs in the task's thread; ``take`` in whichever thread sends a batch (the
    heartbeat sender, the runner at the end): one lock keeps them apart."""

    def __init__(self, ident: dict[str, Any], levelno: int | None, output: bool) -> None:
        self.ident = ident  # run_id, task_id, attempt
        self.levelno = levelno  # None: stdout/stderr only
        self.output = output
        self.thread = threading.get_ident()
        self.pid = os.getpid()
        self.tokens = float(BURST)
        self.refilled = time.monotonic()
        self.pending: list[Log] = []
        self.pending_bytes = 0
        self.dropped = 0
        self.kept = 0
        self.partial: dict[str, str] = {}
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- in the task

    def record(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # bad %-arguments: say what there was, as logging would
            message = f"{record.msg!r} % {record.args!r}"
        exc_text = ""
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            exc_text = record.exc_text
        elif record.exc_text:
            exc_text = record.exc_text
        if record.stack_info:
            exc_text = f"{exc_text}\n{record.stack_info}" if exc_text else record.stack_info
        self.add(record.levelname, record.levelno, record.name, message, record.created,
                 exc_text)

    def write(self, stream: str, text: str) -> None:
        """Output written to ``stream``: complete lines become records."""
        buffered = self.partial.get(stream, "") + text
        if "\n" not in buffered:  # a line in the making (held to a bounded length)
            self.partial[stream] = buffered[: MAX_MESSAGE * 2]
            return
        *lines, rest = buffered.split("\n")
        self.partial[stream] = rest
        for line in lines:
            self._line(stream, line)

    def _line(self, stream: str, line: str) -> None:
        levelno = OUTPUT_LEVELS[stream]
        self.add(logging.getLevelName(levelno), levelno, stream, line.rstrip("\r"), time.time())

    def add(
        self, level: str, levelno: int, logger: str, message: str, created: float,
        exc_text: str = "",
    ) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(float(BURST), self.tokens + (now - self.refilled) * RATE)
            self.refilled = now
            if self.tokens < 1.0 or self.pending_bytes >= MAX_PENDING_BYTES:
                self.dropped += 1
                return
            self.tokens -= 1.0
            message = _capped(message)
            exc_text = _capped(exc_text) if exc_text else ""
            self.pending.append(Log(
                **self.ident, message=message, level=level.lower(), levelno=levelno,
                logger=logger, time=created, host=_hostname(), pid=self.pid, exc_text=exc_text,
            ))
            self.pending_bytes += len(message) + len(exc_text)
            self.kept += 1

    # ---------------------------------------------------------------- going home

    def take(self) -> list[Log]:
        """The records waiting to be sent (a heartbeat batch carries them)."""
        with self.lock:
            taken, self.pending, self.pending_bytes = self.pending, [], 0
        return taken

    def finish(self) -> list[Log]:
        """What goes ahead of the terminal event: the last records, an unfinished output
        line, and one frame counting what the limits dropped (if any)."""
        for stream, rest in list(self.partial.items()):
            if rest:
                self._line(stream, rest)
        self.partial.clear()
        taken = self.take()
        if self.dropped:
            taken.append(Log(
                **self.ident, level="warning", levelno=logging.WARNING, logger=_OWN,
                message=f"{self.dropped} records dropped (the worker's limit per run: "
                        f"{RATE:g} records/s, bursts of {BURST}, {MAX_PENDING_BYTES} bytes "
                        f"waiting; {self.kept} kept)",
                time=time.time(), host=_hostname(), pid=self.pid, dropped=self.dropped,
            ))
        return taken


def level_of(value: Any) -> int | None:
    """The ``task_logs`` value a verified envelope carries (a level name the caller
    checked), as a number; None: off."""
    if not value or str(value).upper() == "OFF":
        return None
    found = logging.getLevelName(str(value).upper())
    return found if isinstance(found, int) else logging.INFO


def for_run(ident: dict[str, Any], task_logs: Any, task_output: Any) -> Capture | None:
    """A capture for the run ``ident`` names, or None (nothing to capture: the usual)."""
    levelno = level_of(task_logs)
    if levelno is None and not task_output:
        return None
    return Capture(ident, levelno, bool(task_output))


_OFF: AbstractContextManager[None] = nullcontext()


def capturing(capture: Capture | None) -> AbstractContextManager[None]:
    """Within the block, ``capture`` gets its thread's records (and output lines)."""
    return _OFF if capture is None else _active(capture)


@contextmanager
def _active(capture: Capture) -> Iterator[None]:
    _ROUTER.add(capture)
    try:
        yield
    finally:
        _ROUTER.remove(capture)


# ---------------------------------------------------------------- one per process


class _Passing(threading.local):
    writing = False  # this thread is inside a teed write (see _Tee)


_passing = _Passing()


class _Router(logging.Handler):
    """The one handler (on the root logger, only while a capture runs) that hands each
    record to the capture of the thread that made it."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.runs: dict[int, Capture] = {}
        self.outputs: dict[int, Capture] = {}
        self.guard = threading.Lock()
        self.root_level: int | None = None  # the root's level before we lowered it
        self.lowered_to: int | None = None
        self.floor: _Floor | None = None
        self.tees: list[_Tee] = []
        self.loggers: list[logging.Logger] = []  # where the router is attached

    # Logging calls handlers in the thread that logs, so that thread's capture is the
    # record's. Routed without the handler lock logging would take: nothing here is
    # shared between threads but the dict, read once.
    def handle(self, record: logging.LogRecord) -> bool:
        capture = self.runs.get(threading.get_ident())
        if (
            capture is not None
            and capture.levelno is not None
            and record.levelno >= capture.levelno
            and not _passing.writing
            and not (record.name == _OWN or record.name.startswith("wove_adapters."))
        ):
            try:
                capture.record(record)
            except Exception:  # capturing must never break the task's logging call
                capture.dropped += 1
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle routes
        self.handle(record)

    def add(self, capture: Capture) -> None:
        with self.guard:
            if capture.levelno is not None:
                if not self.runs:
                    self._attach()
                self.runs[capture.thread] = capture
                self._lower(capture.levelno)
            if capture.output:
                if not self.outputs:
                    self._tee()
                self.outputs[capture.thread] = capture

    def remove(self, capture: Capture) -> None:
        with self.guard:
            if self.runs.get(capture.thread) is capture:
                del self.runs[capture.thread]
                if not self.runs:
                    self._detach()
                    self._restore()
            if self.outputs.get(capture.thread) is capture:
                del self.outputs[capture.thread]
                if not self.outputs:
                    self._untee()

    def _attach(self) -> None:
        """On the root logger, and on every logger that does not propagate (Celery's
        ``celery.task``, parent of its task loggers, is one): a record reaches exactly
        one of them, the first of its chain that stops it, or the root."""
        root = logging.getLogger()
        self.loggers = [root, *(
            logger for logger in list(root.manager.loggerDict.values())
            if isinstance(logger, logging.Logger) and not logger.propagate
        )]
        for logger in self.loggers:
            logger.addHandler(self)

    def _detach(self) -> None:
        for logger in self.loggers:
            logger.removeHandler(self)
        self.loggers = []

    def _lower(self, levelno: int) -> None:
        root = logging.getLogger()
        if root.level == logging.NOTSET or root.level <= levelno:
            return
        if self.root_level is None:
            self.root_level = root.level
            self.floor = _Floor(root.level)
            for handler in root.handlers:
                if handler is not self:
                    handler.addFilter(self.floor)
        root.setLevel(levelno)
        self.lowered_to = levelno

    def _restore(self) -> None:
        root = logging.getLogger()
        if self.floor is not None:
            for handler in root.handlers:
                handler.removeFilter(self.floor)
        if self.root_level is not None and root.level == self.lowered_to:
            root.setLevel(self.root_level)  # unless someone set another level meanwhile
        self.root_level = self.lowered_to = None
        self.floor = None

    def _tee(self) -> None:
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, _Tee) or current is None:
                continue
            tee = _Tee(name, current, self.outputs)
            setattr(sys, name, tee)
            self.tees.append(tee)

    def _untee(self) -> None:
        for tee in self.tees:
            if getattr(sys, tee.name) is tee:  # a task that replaced it keeps its own
                setattr(sys, tee.name, tee.original)
        self.tees = []

    def after_fork(self) -> None:
        """A child forked while a capture ran holds none of them: undo what they did."""
        self.guard = threading.Lock()
        if self.runs:
            self._detach()
            self._restore()
        if self.outputs:
            self._untee()
        self.runs.clear()
        self.outputs.clear()


class _Floor(logging.Filter):
    """On the root's handlers while the root is lowered: a record passes when it would
    have been made before (its level reaches the root's old level, or a logger between it
    and the root has a level of its own that lets it through)."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        logger: Any = logging.root.manager.loggerDict.get(record.name)  # never makes one
        while isinstance(logger, logging.Logger) and logger.parent is not None:
            if logger.level:
                return bool(record.levelno >= logger.level)
            logger = logger.parent
        return False


class _Tee:
    """``sys.stdout`` / ``sys.stderr`` while an output capture runs: everything goes on
    to the original stream; what the capturing run's thread writes is also captured."""

    def __init__(self, name: str, original: Any, outputs: dict[int, Capture]) -> None:
        self.name = name
        self.original = original
        self._outputs = outputs

    def write(self, text: str) -> int:
        capture = self._outputs.get(threading.get_ident())
        if capture is not None and isinstance(text, str) and text:
            try:
                capture.write(self.name, text)
            except Exception:  # capturing must never break the task's print
                capture.dropped += 1
        # A stream that logs what it is given (Celery's redirected stdout) must not have
        # the line captured a second time as a record.
        _passing.writing = True
        try:
            return int(self.original.write(text) or 0)
        finally:
            _passing.writing = False

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


_ROUTER = _Router()
os.register_at_fork(after_in_child=_ROUTER.after_fork)
