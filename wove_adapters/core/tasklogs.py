"""Task logs, the caller side: a worker's verified ``log`` frame becomes a ``LogRecord``
of the ``wove_adapters.task`` logger, so a task's logging shows wherever the calling
program's logging goes (docs/observability.md, "Logs"; ``worker.tasklogs`` captures).

Why a thread of its own: handlers are the application's (a file, a socket, a log
shipper) and may block; the dispatcher's loop must not. The loop only checks the run's
cap and whether the logger would take the level at all, and queues the record; one
daemon thread hands records to ``logging`` in the order they came. ``flush`` waits for
it (a test, or a program that exits right after its last result: an exit hook also
flushes, before the interpreter stops its threads).

Each run may send at most ``task_logs_max_records`` records and ``task_logs_max_bytes``
bytes of text (``executor_config``); beyond either its records are dropped and counted
(``Dispatcher.stats["task_logs_dropped"]``), and one WARNING record says so. Nothing here
imports a backend library.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import MutableMapping
from typing import Any

LOGGER_NAME = "wove_adapters.task"
# Records queued for the emitting thread beyond this are dropped (a handler that blocks
# must not make the caller hold every record of every run in memory).
MAX_QUEUED = 100_000

_logger = logging.getLogger(LOGGER_NAME)
# The record attributes (``extra``) every task record carries.
ATTRIBUTES = ("run_id", "task_id", "environment", "attempt", "worker_host", "worker_pid",
              "worker_logger", "dropped_records")


class TaskLogs:
    """One dispatcher's emitter of its runs' records, with the per-run cap."""

    def __init__(
        self, environment: str, max_records: int, max_bytes: int, stats: dict[str, int]
    ) -> None:
        self.environment = environment
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.stats = stats
        stats.setdefault("task_logs_emitted", 0)
        stats.setdefault("task_logs_dropped", 0)

    def take(self, frame: dict[str, Any], counts: MutableMapping[str, Any]) -> None:
        """Emit one worker record of a run; ``counts`` is the run's own (its attempt's
        ``extra``), so the cap holds over every attempt of the run."""
        used = counts.get("task_logs")
        if used is None:
            used = counts["task_logs"] = [0, 0, 0]  # records, bytes, dropped
        message = str(frame.get("message", ""))
        exc_text = str(frame.get("exc_text") or "")
        size = len(message) + len(exc_text)
        summary = bool(frame.get("dropped"))  # the worker's count of its own drops: kept
        if not summary and (used[0] >= self.max_records or used[1] + size > self.max_bytes):
            used[2] += 1
            self.stats["task_logs_dropped"] += 1
            if used[2] == 1:
                notice = {**frame, "logger": "wove_adapters"}  # the caller's, not the task's
                self._emit(notice, logging.WARNING, "warning", exc_text="", message=(
                    f"wove-adapters: run {frame.get('run_id')} sent more task log records "
                    f"than the caller takes ({self.max_records} records, {self.max_bytes} "
                    f"bytes per run: executor_config task_logs_max_records / "
                    f"task_logs_max_bytes); its later records are dropped"))
            return
        used[0] += 1
        used[1] += size
        levelno = int(frame.get("levelno") or logging.INFO)
        self._emit(frame, levelno, str(frame.get("level") or ""), message, exc_text)

    def _emit(
        self, frame: dict[str, Any], levelno: int, level: str, message: str, exc_text: str
    ) -> None:
        if not _logger.isEnabledFor(levelno):
            return  # nobody would see it: no record, no hop to the thread
        created = float(frame.get("time") or time.time())
        record = _logger.makeRecord(
            LOGGER_NAME, levelno, "(worker)", 0, message, (), None,
            extra={
                "run_id": frame.get("run_id", ""),
                "task_id": frame.get("task_id", ""),
                "environment": self.environment,
                "attempt": int(frame.get("attempt", 1)),
                "worker_host": frame.get("host", ""),
                "worker_pid": int(frame.get("pid") or 0),
                "worker_logger": frame.get("logger", ""),
                "dropped_records": int(frame.get("dropped") or 0),
            },
        )
        record.relativeCreated += (created - record.created) * 1000
        record.created = created
        record.msecs = (created - int(created)) * 1000
        if level:
            record.levelname = level.upper()  # the worker's name, custom levels included
        if exc_text:
            record.exc_text = exc_text  # formatters append it, as for a local exception
        if _EMITTER.put(record):
            self.stats["task_logs_emitted"] += 1
        else:
            self.stats["task_logs_dropped"] += 1


class _Emitter:
    """The one thread that hands task records to ``logging`` (see the module docstring).

    Records are handed over in batches: the loop appends under a lock and wakes the
    thread only when it sleeps, so a run's records cost the loop a list append each,
    not a thread wake-up each."""

    def __init__(self) -> None:
        lock = threading.Lock()
        self._work = threading.Condition(lock)  # the thread waits here for records
        self._idle = threading.Condition(lock)  # ``flush`` waits here for none left
        self._records: list[logging.LogRecord] = []
        self._queued = 0  # appended and not yet handled
        self._sleeping = False
        self._thread: threading.Thread | None = None

    def put(self, record: logging.LogRecord) -> bool:
        with self._work:
            if self._queued >= MAX_QUEUED:
                return False
            self._queued += 1
            self._records.append(record)
            if self._sleeping:
                self._work.notify()
            elif self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="wove-task-logs", daemon=True
                )
                self._thread.start()
                _register_exit_flush()
        return True

    def _run(self) -> None:
        while True:
            with self._work:
                while not self._records:
                    self._sleeping = True
                    self._work.wait()
                self._sleeping = False
                batch, self._records = self._records, []
            for record in batch:
                try:
                    _logger.handle(record)
                except Exception:  # a handler's own error: logging reports it, we go on
                    pass
            with self._work:
                self._queued -= len(batch)
                if not self._queued:
                    self._idle.notify_all()

    def flush(self, timeout: float | None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: not self._queued, timeout)


_EMITTER = _Emitter()
_exit_hook = False


def flush(timeout: float | None = 5.0) -> bool:
    """Wait until every task record received so far has been handed to ``logging``;
    False if ``timeout`` passed first (a handler that blocks)."""
    return _EMITTER.flush(timeout)


def _register_exit_flush() -> None:
    """Flush at exit before the standard library joins threads (``threading`` refuses
    new work by the time ``atexit`` runs; see worker.sender)."""
    global _exit_hook
    if _exit_hook:
        return
    _exit_hook = True
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(lambda: flush(5.0))
            return
    except RuntimeError:  # already shutting down
        return
    import atexit

    atexit.register(lambda: flush(5.0))
