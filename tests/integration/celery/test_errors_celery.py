"""Point 4 of issue 10 on Celery: errors keep their story.

A task raising ValueError in a prefork child reaches the caller as ValueError with the
worker's traceback chained (``concurrent.futures.process`` style): the formatted
exception names the task's function and line. A task whose module the worker cannot
import fails with WorkerImportError naming the backend, host, pid and the fix.
"""

from __future__ import annotations

import inspect
import os
import socket
import traceback
from types import ModuleType
from typing import Any

import pytest
from celery_services import CeleryService

from wove_adapters.core.codec import RemoteTraceback
from wove_adapters.core.errors import WorkerImportError
from wove_adapters.integration.hub import Hub


def explode_on_celery(value: int) -> int:
    """Raises in the worker (this module is pickled by value: the code object keeps its
    line numbers)."""
    if value > 0:
        raise ValueError(f"celery says no to {value}")
    return value


_lines, _first = inspect.getsourcelines(explode_on_celery)
RAISE_LINE = _first + next(i for i, line in enumerate(_lines) if "raise ValueError" in line)


def _hub(service: CeleryService) -> Hub:
    return Hub(environments={"c-errors": {"executor": "celery",
                                          "executor_config": dict(service.executor_config)}},
               default_environment="c-errors")


def test_remote_traceback_reaches_the_caller(redis_celery: CeleryService) -> None:
    hub = _hub(redis_celery)
    try:
        with pytest.raises(ValueError, match="celery says no to 4") as caught:
            hub.run(explode_on_celery, 4)
    finally:
        hub.close()
    exc = caught.value
    assert type(exc) is ValueError
    assert isinstance(exc.__cause__, RemoteTraceback)
    formatted = "".join(traceback.format_exception(exc))
    assert f"line {RAISE_LINE}, in explode_on_celery" in formatted, formatted
    assert formatted.index("explode_on_celery") < formatted.index(
        "The above exception was the direct cause"
    )


def test_import_error_names_the_worker_and_the_fix(
    redis_celery: CeleryService, caller_only_module: ModuleType
) -> None:
    task: Any = caller_only_module.task
    hub = _hub(redis_celery)
    try:
        with pytest.raises(ImportError) as caught:
            hub.run(task, 1)
    finally:
        hub.close()
    exc = caught.value
    assert isinstance(exc, WorkerImportError), repr(exc)
    message = str(exc)
    assert f"celery worker on host {socket.gethostname()}" in message
    assert exc.pid is not None and exc.pid != os.getpid() and f"(pid {exc.pid})" in message
    assert f"module '{caller_only_module.__name__}'" in message
    assert "PYTHONPATH" in message and "install" in message
