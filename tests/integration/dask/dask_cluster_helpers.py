"""A real Dask cluster for the session: ``dask scheduler`` + ``dask worker`` (two worker
processes under nannies, one thread each), started with Dask's own CLI, bound to
127.0.0.1 (dashboards on 127.0.0.1:0), stopped by process group at the end
(``tests/support/dask_cli.py``).

The scheduler runs with ``allowed-failures=0`` (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``),
as the docs tell users to: a worker killed mid-task fails the task instead of Dask
re-running it, so wove-adapters' orphan policy decides. Worker processes get this
process's environment (``WOVE_ADAPTERS_HOME`` among it) so they find the signing key.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import dask_cli

WORKERS = 2
RESOURCES = "slot=4"  # a resource every test worker has, to check pass-through


@dataclass
class DaskCluster:
    address: str
    scheduler_file: str
    log_dir: Path


def start_cluster(tmp: Path) -> Iterator[DaskCluster]:
    """Start scheduler + workers in ``tmp``; yields once they are ready, stops them after."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        cluster = dask_cli.start(tmp, WORKERS, "--resources", RESOURCES, "--name", "wove-test",
                                 env=env, timeout=120)
    except Exception as exc:  # say why, with the logs
        pytest.fail(f"the test dask cluster did not start ({exc}); logs in {tmp}")
    try:
        yield DaskCluster(address=cluster.address, scheduler_file=str(cluster.scheduler_file),
                          log_dir=tmp)
    finally:
        _stop_dispatchers()  # their Dask clients would otherwise retry a stopped scheduler
        cluster.stop()


def _stop_dispatchers() -> None:
    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all

    shared_loop.run_sync(stop_all(), 60)


def wait_for_workers(address: str, count: int = WORKERS, timeout: float = 120) -> None:
    """Before each test: all workers up (a killed one is restarted by its nanny) and idle.

    A cancelled task that was already running keeps its worker thread busy until it ends
    (Dask cannot stop a running thread; the adapter does not claim it can). Such leftover
    threads would eat the next test's slots, so workers still executing are restarted.
    """
    from distributed import Client

    with Client(address, timeout=30) as client:
        client.wait_for_workers(count, timeout=timeout)
        def executing(dask_worker: Any) -> int:  # nested: pickled by value for the workers
            return int(dask_worker.state.executing_count)

        busy = [addr for addr, n in client.run(executing).items() if n]
        if busy:
            client.restart_workers(busy, timeout=timeout)
            client.wait_for_workers(count, timeout=timeout)
