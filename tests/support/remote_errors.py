"""What every backend's error tests check (point 4 of issue 10): errors keep their story.

A task raising ValueError in a worker reaches the caller as ValueError with the worker's
traceback chained (``concurrent.futures.process`` style), so the formatted exception
names the task's function and line. A task whose module the worker cannot import fails
with ``WorkerImportError`` naming the backend, host, pid and the fix. The backend's test
module defines the raising task itself: test modules are pickled by value, so the task's
code object keeps that file's name and line numbers.
"""

from __future__ import annotations

import inspect
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from wove_adapters.core.codec import RemoteTraceback
from wove_adapters.core.errors import WorkerImportError


def raise_line(task: Callable[..., Any]) -> int:
    """The line of ``task`` that raises its ValueError."""
    lines, first = inspect.getsourcelines(task)
    return first + next(i for i, line in enumerate(lines) if "raise ValueError" in line)


def run_and_close(hub: Any, task: Callable[..., Any], *args: Any,
                  raises: type[BaseException], match: str | None = None) -> BaseException:
    """What ``hub.run(task, *args)`` raised (it must raise ``raises``); the hub is closed
    whatever happened."""
    try:
        with pytest.raises(raises, match=match) as caught:
            hub.run(task, *args)
    finally:
        hub.close()
    return caught.value


def assert_remote_traceback(exc: BaseException, task: Callable[..., Any]) -> None:
    """``exc`` is the task's own ValueError, the worker's traceback chained to it."""
    assert type(exc) is ValueError  # the original type, not a wrapper
    assert isinstance(exc.__cause__, RemoteTraceback)
    formatted = "".join(traceback.format_exception(exc))
    assert f"line {raise_line(task)}, in {task.__name__}" in formatted, formatted
    # The worker's frames come first, then the caller's, as concurrent.futures prints them.
    assert formatted.index(task.__name__) < formatted.index(
        "The above exception was the direct cause"
    )


def assert_worker_import_error(exc: BaseException, backend: str, module_name: str) -> str:
    """``exc`` names the backend's worker, its host and pid (not ours), the module it
    could not import and the fix; returns the message for the backend's own checks."""
    assert isinstance(exc, WorkerImportError), repr(exc)
    message = str(exc)
    assert f"{backend} worker on host {socket.gethostname()}" in message
    assert exc.pid is not None and exc.pid != os.getpid() and f"(pid {exc.pid})" in message
    assert f"module '{module_name}'" in message
    assert "PYTHONPATH" in message and "install" in message
    return message
