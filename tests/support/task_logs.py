"""What the task-log tests share (docs/observability.md, "Logs"): tasks that log, print or
flood, and a handler on ``wove_adapters.task`` that keeps the records the caller emits.

The tasks ship by value (this module is registered with cloudpickle), so any worker runs
them without this directory on its path.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

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


def chatty_arrives(hub: Any, collected: Collected, n: int) -> None:
    """Run ``chatty(n)`` on ``hub``'s default environment (``task_logs = "INFO"``) and
    check its records as the caller must emit them: in order, at the worker's levels,
    with every attribute, the exception's text and the worker's time."""
    environment = hub.config.default_environment
    before = time.time()
    future = hub.submit(chatty, n)
    worker_pid = future.result(timeout=60)
    after = time.time()
    got = collected.of("tests.chatty")
    assert [r.getMessage() for r in got] == [f"info {n}", f"warning {n}", f"failed {n}"]
    assert [r.levelname for r in got] == ["INFO", "WARNING", "ERROR"]
    assert [r.levelno for r in got] == [logging.INFO, logging.WARNING, logging.ERROR]
    for record in got:
        attributes = record.__dict__
        assert record.name == tasklogs.LOGGER_NAME
        assert attributes["run_id"] == future.run_id
        assert attributes["task_id"] == "chatty"
        assert attributes["environment"] == environment
        assert attributes["attempt"] == 1
        assert attributes["worker_host"] == socket.gethostname()
        assert attributes["worker_pid"] == worker_pid != os.getpid()
        assert attributes["dropped_records"] == 0
        assert before <= record.created <= after
    assert f"ValueError: bad {n}" in (got[2].exc_text or "")
    assert "Traceback" in logging.Formatter().format(got[2])


def one_run_per_item(collected: Collected, count: int) -> set[str]:
    """After ``item(n)`` ran for ``n`` in ``range(count)``: both records of an item name
    one run, and no two items share one. Returns the run ids."""
    run_of: dict[int, set[str]] = {}
    for record in collected.of("tests.item"):
        number = int(record.getMessage().split()[1])
        run_of.setdefault(number, set()).add(record.__dict__["run_id"])
    assert sorted(run_of) == list(range(count))
    assert all(len(ids) == 1 for ids in run_of.values()), run_of
    ids = {next(iter(found)) for found in run_of.values()}
    assert len(ids) == count
    return ids


def nothing_arrives(hub: Any, collected: Collected) -> None:
    """With task_logs and task_output unset, a task that logs and prints sends nothing:
    no record in the caller, and not one worker record reached the dispatcher (its sink
    is made by the first)."""
    hub.run(chatty, 1)
    hub.run(printer, 1)
    assert tasklogs.flush(10.0)
    assert collected.records == []
    assert "task_logs_emitted" not in hub.dispatcher(hub.config.default_environment).stats


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


@pytest.fixture
def records() -> Iterator[Collected]:
    """The records the caller emits during the test (a test module imports this)."""
    with collected() as handler:
        yield handler


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
