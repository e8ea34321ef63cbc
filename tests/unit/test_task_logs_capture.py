"""The worker side of task logs in one process (``worker.tasklogs``): while a run
captures, the worker's own logging shows exactly what it showed before, and everything
the capture changed is undone when it ends; off installs nothing."""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from wove_adapters.worker import tasklogs

IDENT = {"run_id": "r1", "task_id": "t", "attempt": 1}


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def worker_logging() -> Iterator[Kept]:
    """A worker's logging as Python leaves it by default (root at WARNING) with one
    handler on the root, and one logger with a level of its own."""
    root = logging.getLogger()
    saved = root.level, list(root.handlers)
    kept = Kept()
    root.handlers = [kept]
    root.setLevel(logging.WARNING)
    own = logging.getLogger("tests.own_level")
    own.setLevel(logging.DEBUG)
    try:
        yield kept
    finally:
        root.handlers = saved[1]
        root.setLevel(saved[0])
        own.setLevel(logging.NOTSET)


def test_the_worker_sees_what_it_saw_before(worker_logging: Kept) -> None:
    capture = tasklogs.for_run(IDENT, "DEBUG", False)
    assert capture is not None
    root = logging.getLogger()
    with tasklogs.capturing(capture):
        assert root.level == logging.DEBUG  # lowered, so log.debug makes a record
        logging.getLogger("tests.plain").info("plain info")
        logging.getLogger("tests.plain").warning("plain warning")
        logging.getLogger("tests.own_level").debug("own debug")
        logging.getLogger("wove_adapters.worker").warning("ours")
    # The worker's handler: what it showed before (the WARNING and the logger with its
    # own DEBUG level), not the INFO record the lowered root now lets through.
    assert worker_logging.messages == ["plain warning", "own debug", "ours"]
    # The capture: the task's records at DEBUG and up, never this package's own.
    assert [log.message for log in capture.finish()] == [
        "plain info", "plain warning", "own debug"]
    # Undone: the level, the handler's filter, the router.
    assert root.level == logging.WARNING
    assert all(handler.filters == [] for handler in root.handlers)
    assert not any(isinstance(handler, tasklogs._Router) for handler in root.handlers)
    logging.getLogger("tests.plain").info("after")
    assert worker_logging.messages[-1] == "ours"


def test_other_threads_are_not_captured(worker_logging: Kept) -> None:
    capture = tasklogs.for_run(IDENT, "INFO", False)
    assert capture is not None
    with tasklogs.capturing(capture):
        thread = threading.Thread(
            target=lambda: logging.getLogger("tests.plain").warning("other thread"))
        thread.start()
        thread.join()
        logging.getLogger("tests.plain").warning("this thread")
    assert [log.message for log in capture.finish()] == ["this thread"]
    assert worker_logging.messages == ["other thread", "this thread"]


def test_output_is_teed_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    capture = tasklogs.for_run(IDENT, None, True)
    assert capture is not None
    with tasklogs.capturing(capture):
        print("one")
        print("two", file=sys.stderr)
        sys.stdout.write("three")
    assert sys.stdout is out and sys.stderr is err
    assert out.getvalue() == "one\nthree" and err.getvalue() == "two\n"
    logs = capture.finish()
    assert [(log.logger, log.message, log.levelno) for log in logs] == [
        ("stdout", "one", logging.INFO), ("stderr", "two", logging.WARNING),
        ("stdout", "three", logging.INFO)]


def test_off_installs_nothing() -> None:
    root = logging.getLogger()
    handlers, level, stdout = list(root.handlers), root.level, sys.stdout
    assert tasklogs.for_run(IDENT, None, False) is None
    assert tasklogs.for_run(IDENT, "OFF", None) is None
    with tasklogs.capturing(None):
        assert root.handlers == handlers and root.level == level and sys.stdout is stdout
