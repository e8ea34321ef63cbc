"""Point 4 of issue 10 on Celery: errors keep their story.

A task raising ValueError in a prefork child reaches the caller as ValueError with the
worker's traceback chained (``concurrent.futures.process`` style): the formatted
exception names the task's function and line. A task whose module the worker cannot
import fails with WorkerImportError naming the backend, host, pid and the fix. The
checks themselves are every backend's (``tests/support/remote_errors.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from celery_services import CeleryService

from wove_adapters.integration.hub import Hub

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from remote_errors import assert_remote_traceback, assert_worker_import_error, run_and_close


def explode_on_celery(value: int) -> int:
    """Raises in the worker (this module is pickled by value: the code object keeps its
    line numbers)."""
    if value > 0:
        raise ValueError(f"celery says no to {value}")
    return value


def _hub(service: CeleryService) -> Hub:
    return Hub(environments={"c-errors": {"executor": "celery",
                                          "executor_config": dict(service.executor_config)}},
               default_environment="c-errors")


def test_remote_traceback_reaches_the_caller(redis_celery: CeleryService) -> None:
    exc = run_and_close(_hub(redis_celery), explode_on_celery, 4,
                        raises=ValueError, match="celery says no to 4")
    assert_remote_traceback(exc, explode_on_celery)


def test_import_error_names_the_worker_and_the_fix(
    redis_celery: CeleryService, caller_only_module: ModuleType
) -> None:
    exc = run_and_close(_hub(redis_celery), caller_only_module.task, 1, raises=ImportError)
    assert_worker_import_error(exc, "celery", caller_only_module.__name__)
