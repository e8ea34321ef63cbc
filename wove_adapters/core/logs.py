"""``log_level`` and ``log_format``: the project's own logging, set from configuration.

Why here and not left to the application: a program that only sets ``WOVE__LOG_LEVEL=INFO``
(a worker host, a CLI call, a test run) should see our lines without writing logging
code, and a log shipper wants them as JSON. Only the ``wove_adapters`` logger (and so
every logger under it) is touched, never the root logger or another library's: with
neither setting given nothing changes, and our records propagate to whatever the
application configured, as any library's do. With either given, the ``wove_adapters``
logger gets its level and one handler of its own on stderr, and stops propagating (else
an application that also logs to stderr would print each line twice).

Applied once per process, when the first Hub or dispatcher starts (``apply_settings``);
later configurations in the same process do not reconfigure it. ``configure_logging``
is the direct form, idempotent (it replaces its own handler), and ``reset_logging``
undoes it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

from wove_adapters.core.tasklogs import ATTRIBUTES as TASK_ATTRIBUTES

__all__ = ["JsonFormatter", "apply_settings", "configure_logging", "reset_logging"]

LOGGER = "wove_adapters"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_MARK = "_wove_adapters_handler"
_lock = threading.Lock()
_applied = False
_saved: tuple[int, bool] | None = None  # the logger's level and propagate before us


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, ``exc_info`` / ``stack_info`` text when the record has them, and a task
    record's attributes (``run_id``, ``task_id``, ... see ``core.tasklogs``). The
    message is formatted (``%`` arguments applied) and a line never spans lines: JSON
    escapes the newlines of a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        for name in TASK_ATTRIBUTES:  # a task's record from its worker (core.tasklogs)
            if name in record.__dict__:
                entry[name] = record.__dict__[name]
        return json.dumps(entry, ensure_ascii=False, default=str)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"Invalid log_format {fmt!r}. Expected one of: 'text', 'json'.")


def configure_logging(
    level: str | int | None, fmt: str = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Give the ``wove_adapters`` logger ``level`` (WARNING when None) and one stderr
    handler formatting as ``fmt``; returns that handler. Calling it again replaces it."""
    global _saved
    logger = logging.getLogger(LOGGER)
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_formatter(fmt))
    setattr(handler, _HANDLER_MARK, True)
    resolved = logging.WARNING if level is None else level
    if isinstance(resolved, str):
        resolved = resolved.upper()
        if not isinstance(logging.getLevelName(resolved), int):
            raise ValueError(f"Invalid log_level {level!r}")
    with _lock:
        if _saved is None:
            _saved = (logger.level, logger.propagate)
        _remove_ours(logger)
        logger.addHandler(handler)
        logger.setLevel(resolved)
        logger.propagate = False
    return handler


def reset_logging() -> None:
    """Remove our handler and give the logger back its level and propagation."""
    global _saved, _applied
    logger = logging.getLogger(LOGGER)
    with _lock:
        _remove_ours(logger)
        if _saved is not None:
            logger.setLevel(_saved[0])
            logger.propagate = _saved[1]
        _saved = None
        _applied = False


def _remove_ours(logger: logging.Logger) -> None:
    for old in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(old)
        old.close()


def apply_settings(settings: Mapping[str, Any]) -> bool:
    """Apply ``log_level`` / ``log_format`` from resolved settings, once per process.

    Nothing happens (and the next call may still apply) while neither is set, i.e.
    ``log_level`` is None and ``log_format`` is the default ``text``. Returns True when
    this call configured logging."""
    global _applied
    level = settings.get("log_level")
    fmt = settings.get("log_format") or "text"
    if _applied or (level is None and fmt == "text"):
        return False
    with _lock:
        if _applied:
            return False
        _applied = True
    configure_logging(level, fmt)
    return True
