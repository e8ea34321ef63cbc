"""A real Dask cluster for the session: ``dask scheduler`` + ``dask worker`` (two worker
processes under nannies, one thread each), started with Dask's own CLI, bound to
127.0.0.1 (dashboards on 127.0.0.1:0), stopped by process group at the end.

The scheduler runs with ``allowed-failures=0`` (``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES``),
as the docs tell users to: a worker killed mid-task fails the task instead of Dask
re-running it, so wove-adapters' orphan policy decides. Worker processes get this
process's environment (``WOVE_ADAPTERS_HOME`` among it) so they find the signing key.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

WORKERS = 2
RESOURCES = "slot=4"  # a resource every test worker has, to check pass-through


@dataclass
class DaskCluster:
    address: str
    scheduler_file: str
    log_dir: Path


def _dask_cli() -> str:
    path = Path(sys.executable).with_name("dask")
    if not path.exists():
        pytest.fail(f"the 'dask' CLI is missing next to {sys.executable}: "
                    "pip install 'wove-adapters[dask]'")
    return str(path)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # Our own process group only (start_new_session): the CLI, its nannies and workers.
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"'dask scheduler' exited with {proc.returncode}:\n"
                        f"{log.read_text()[-3000:]}")
        if path.exists():
            text = path.read_text()
            if text.strip():
                try:
                    return str(json.loads(text)["address"])
                except (ValueError, KeyError):
                    pass
        time.sleep(0.05)
    pytest.fail(f"'dask scheduler' did not write {path} within {timeout}s:\n"
                f"{log.read_text()[-3000:]}")


def start_cluster(tmp: Path) -> Iterator[DaskCluster]:
    """Start scheduler + workers in ``tmp``; yields once they are ready, stops them after."""
    from distributed import Client

    scheduler_file = tmp / "scheduler.json"
    env = {
        **os.environ,
        "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
        "PYTHONUNBUFFERED": "1",
    }
    cli = _dask_cli()
    scheduler_log = tmp / "scheduler.log"
    worker_log = tmp / "worker.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(scheduler_log, "wb") as out:
            procs.append(subprocess.Popen(
                [cli, "scheduler", "--host", "127.0.0.1", "--port", "0",
                 "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            ))
        address = _wait_for_file(scheduler_file, procs[0], scheduler_log, 60)
        with open(worker_log, "wb") as out:
            procs.append(subprocess.Popen(
                [cli, "worker", address, "--nworkers", str(WORKERS), "--nthreads", "1",
                 "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                 "--resources", RESOURCES, "--name", "wove-test"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            ))
        with Client(address, timeout=30) as client:
            try:
                client.wait_for_workers(WORKERS, timeout=120)
            except Exception as exc:  # say why, with the logs
                pytest.fail(f"{WORKERS} dask workers did not join within 120s ({exc}):\n"
                            f"{worker_log.read_text()[-3000:]}")
        yield DaskCluster(address=address, scheduler_file=str(scheduler_file), log_dir=tmp)
    finally:
        _stop_dispatchers()  # their Dask clients would otherwise retry a stopped scheduler
        for proc in reversed(procs):
            _stop(proc)


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
