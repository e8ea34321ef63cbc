"""Point 4 of issue 10 on the ``process`` adapter: errors keep their story.

A task that raises in a worker process reaches the caller as its own type, with the
worker's traceback chained the way ``concurrent.futures.process`` chains it, so the
formatted exception names the task's function and line. A task whose module the worker
cannot import fails with ``WorkerImportError``: backend, host, pid and the fix.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from wove_adapters.core.errors import WorkerImportError
from wove_adapters.integration.hub import Hub

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from remote_errors import assert_remote_traceback, assert_worker_import_error


def explode_remotely(value: int) -> int:
    """The task: raises in the worker, in a function of this module (pickled by value,
    so its code object keeps this file's name and line numbers)."""
    if value > 0:
        raise ValueError(f"bad value {value}")
    return value


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    with Hub(
        environments={"p": {"executor": "process", "executor_config": {}}},
        default_environment="p",
        ledger=f"sqlite:///{tmp_path / 'runs.db'}",
    ) as hub:
        yield hub


def test_remote_traceback_reaches_the_caller(hub: Hub) -> None:
    with pytest.raises(ValueError, match="bad value 7") as caught:
        hub.run(explode_remotely, 7)
    assert_remote_traceback(caught.value, explode_remotely)


def test_import_error_names_the_worker_and_the_fix(
    hub: Hub, caller_only_module: ModuleType
) -> None:
    assert "PYTHONPATH" not in os.environ or caller_only_module.__file__ not in os.environ[
        "PYTHONPATH"
    ]
    task: Any = caller_only_module.task
    with pytest.raises(ImportError) as caught:
        hub.run(task, 1)
    exc = caught.value
    name = caller_only_module.__name__
    assert_worker_import_error(exc, "process", name)
    assert isinstance(exc, WorkerImportError)
    assert exc.backend == "process" and exc.module == name
    # The remote traceback is chained too (where the worker failed to import it).
    assert "ModuleNotFoundError" in "".join(traceback.format_exception(exc))
