"""Point 4 of issue 10 on Dask: errors keep their story, on both return paths.

A task raising ValueError on a ``dask worker`` reaches the caller as ValueError with the
worker's traceback chained (``concurrent.futures.process`` style), so the formatted
exception names the task's function and line. A task whose module the workers cannot
import fails with WorkerImportError naming the backend, host, pid and how a ``dask
worker`` finds user modules.
"""

from __future__ import annotations

import inspect
import os
import socket
import traceback
from types import ModuleType
from typing import Any

import pytest
from dask_cluster_helpers import DaskCluster, wait_for_workers

from wove_adapters.core.codec import RemoteTraceback
from wove_adapters.core.errors import WorkerImportError
from wove_adapters.integration.hub import Hub


def explode_on_dask(value: int) -> int:
    """Raises on the worker (this module is pickled by value: the code object keeps its
    line numbers)."""
    if value > 0:
        raise ValueError(f"dask says no to {value}")
    return value


_lines, _first = inspect.getsourcelines(explode_on_dask)
RAISE_LINE = _first + next(i for i, line in enumerate(_lines) if "raise ValueError" in line)


@pytest.fixture
def address(dask_cluster: DaskCluster) -> str:
    wait_for_workers(dask_cluster.address)
    return dask_cluster.address


def _hub(address: str, path: str) -> Hub:
    return Hub(environments={f"err-{path}": {"executor": "dask", "executor_config": {
        "address": address, "return_path": path}}}, default_environment=f"err-{path}")


@pytest.mark.parametrize("path", ["http", "native"])
def test_remote_traceback_reaches_the_caller(address: str, path: str) -> None:
    hub = _hub(address, path)
    try:
        with pytest.raises(ValueError, match="dask says no to 3") as caught:
            hub.run(explode_on_dask, 3)
    finally:
        hub.close()
    exc = caught.value
    assert type(exc) is ValueError
    assert isinstance(exc.__cause__, RemoteTraceback)
    formatted = "".join(traceback.format_exception(exc))
    assert f"line {RAISE_LINE}, in explode_on_dask" in formatted, formatted
    assert formatted.index("explode_on_dask") < formatted.index(
        "The above exception was the direct cause"
    )


@pytest.mark.parametrize("path", ["http", "native"])
def test_import_error_names_the_worker_and_the_fix(
    address: str, path: str, caller_only_module: ModuleType
) -> None:
    task: Any = caller_only_module.task
    hub = _hub(address, path)
    try:
        with pytest.raises(ImportError) as caught:
            hub.run(task, 1)
    finally:
        hub.close()
    exc = caught.value
    assert isinstance(exc, WorkerImportError), repr(exc)
    message = str(exc)
    assert f"dask worker on host {socket.gethostname()}" in message
    assert exc.pid is not None and exc.pid != os.getpid() and f"(pid {exc.pid})" in message
    assert f"module '{caller_only_module.__name__}'" in message
    for fix in ("PYTHONPATH", "--preload", "upload_file", "install"):
        assert fix in message, (fix, message)
