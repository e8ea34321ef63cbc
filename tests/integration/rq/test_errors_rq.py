"""Point 4 of issue 10 on RQ: errors keep their story.

A task raising ValueError in a forked work-horse reaches the caller as ValueError with the
worker's traceback chained (``concurrent.futures.process`` style): the formatted
exception names the task's function and line. A task whose module the worker cannot
import fails with WorkerImportError naming the backend, host, pid and the fix. The
checks themselves are every backend's (``tests/support/remote_errors.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from wove_adapters.integration.hub import Hub

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from remote_errors import assert_remote_traceback, assert_worker_import_error, run_and_close


def explode_on_rq(value: int) -> int:
    """Raises in the work-horse (this module is pickled by value: the code object keeps
    its line numbers)."""
    if value > 0:
        raise ValueError(f"rq says no to {value}")
    return value


def _hub(rq_environment: dict[str, Any]) -> Hub:
    return Hub(environments={"r-errors": rq_environment}, default_environment="r-errors")


def test_remote_traceback_reaches_the_caller(rq_environment: dict[str, Any]) -> None:
    exc = run_and_close(_hub(rq_environment), explode_on_rq, 5,
                        raises=ValueError, match="rq says no to 5")
    assert_remote_traceback(exc, explode_on_rq)


def test_import_error_names_the_worker_and_the_fix(
    rq_environment: dict[str, Any], caller_only_module: ModuleType
) -> None:
    exc = run_and_close(_hub(rq_environment), caller_only_module.task, 1, raises=ImportError)
    assert_worker_import_error(exc, "rq", caller_only_module.__name__)
