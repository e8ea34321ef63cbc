"""What the task-log tests share (docs/observability.md, "Logs"): tasks that log, print or
flood, and a handler on ``wove_adapters.task`` that keeps the records the caller emits.

The tasks ship by value (this module is registered with cloudpickle), so any worker runs
them without this directory on its path.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cloudpickle

from wove_adapters.core import tasklogs

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def chatty(n: int) -> int:
    """One record per level and an exception's; returns the worker's pid."""
    log = logging.getLogger("tests.chatty")
    log.debug("debug %d", n)
    log.info("info %d", n)
    log.warning("warning %d", n)
    try:
        raise ValueError(f"bad {n}")
    except ValueError:
        log.exception("failed %d", n)
    return os.getpid()


def printer(n: int) -> int:
    """Output only: a stdout line, a stderr line, a line left open; and a warning record
    at INFO (captured only when task_logs is on)."""
    print(f"out {n}")
    sys.stderr.write(f"err {n}\n")
    logging.getLogger("tests.printer").info("record %d", n)
    sys.stdout.write(f"unfinished {n}")
    return n


def flood(count: int, size: int = 10) -> int:
    """``count`` records as fast as the worker can make them."""
    log = logging.getLogger("tests.flood")
    body = "x" * size
    for index in range(count):
        log.warning("%d %s", index, body)
    return count


def big(size: int) -> int:
    logging.getLogger("tests.big").warning("y" * size)
    return size


def with_thread(n: int) -> int:
    """A record from the task and one from a thread it starts (not followed)."""
    log = logging.getLogger("tests.threads")
    thread = threading.Thread(target=lambda: log.warning("from the thread %d", n))
    thread.start()
    thread.join()
    log.warning("from the task %d", n)
    return n


def slow_talker(marker: str) -> str:
    """Logs, waits (up to 60 s) for ``marker`` to exist, logs again."""
    log = logging.getLogger("tests.slow")
    log.warning("early")
    deadline = time.monotonic() + 60
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    log.warning("late")
    return "done"


def item(n: int) -> int:
    """Two records that name the item: a mapped call's records must keep their run."""
    log = logging.getLogger("tests.item")
    log.warning("item %d first", n)
    log.warning("item %d second", n)
    return n


class Collected(logging.Handler):
    """The records the caller emitted under ``wove_adapters.task``."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def of(self, worker_logger: str) -> list[logging.LogRecord]:
        assert tasklogs.flush(10.0), "task records were not emitted within 10 s"
        return [r for r in self.records if r.worker_logger == worker_logger]  # type: ignore[attr-defined]

    def wait_for(self, predicate: Callable[[logging.LogRecord], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasklogs.flush(1.0)
            if any(predicate(r) for r in self.records):
                return True
            time.sleep(0.02)
        return False


@contextmanager
def collected() -> Iterator[Collected]:
    logger = logging.getLogger(tasklogs.LOGGER_NAME)
    handler = Collected()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
