"""A Dask cluster from Dask's own CLI, for the Dask tests, the fault suite and the Dask
benchmarks: ``dask scheduler`` + ``dask worker`` (nannies, one thread per worker process),
bound to 127.0.0.1 with dashboards on 127.0.0.1:0, each a ``ServiceProcess`` (own process
group, log file, stopped by group: SIGTERM, then SIGKILL).

The scheduler runs with ``allowed-failures=0``, as the project's Dask docs advise: a
worker killed mid-task fails its task (``KilledWorker``) instead of Dask re-running it, so
wove-adapters' orphan policy decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from services import ServiceProcess


def dask_cli() -> str:
    """The ``dask`` script next to this interpreter; says how to install it if missing."""
    path = Path(sys.executable).with_name("dask")
    if not path.exists():
        raise RuntimeError(f"the 'dask' CLI is missing next to {sys.executable}: "
                           "pip install 'wove-adapters[dask]'")
    return str(path)


class DaskCliCluster:
    """One scheduler and any number of ``dask worker`` launches, stopped together."""

    def __init__(self, directory: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = directory / "scheduler.json"
        self.address = ""
        self.env = {**(os.environ if env is None else env),
                    "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
        self.scheduler: ServiceProcess | None = None
        self.workers: list[ServiceProcess] = []

    def _address(self) -> str:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return str(json.loads(self.scheduler_file.read_text())["address"])
        return ""

    def start_scheduler(self, timeout: float = 60.0) -> str:
        """Start the scheduler; returns its address once it wrote its scheduler file."""
        self.scheduler = ServiceProcess(
            "dask scheduler",
            [dask_cli(), "scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.scheduler_file)],
            log=self.directory / "scheduler.log", env=self.env, ready=self._address,
            ready_timeout=timeout, term_group=True, append_log=True,
        ).start()
        self.address = self._address()
        return self.address

    def launch_workers(self, count: int, *extra_args: str) -> ServiceProcess:
        """``dask worker ADDRESS --nworkers count`` (not waited for: see wait_workers)."""
        worker = ServiceProcess(
            "dask worker",
            [dask_cli(), "worker", self.address, "--nworkers", str(count), "--nthreads", "1",
             "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0", *extra_args],
            log=self.directory / f"worker-{len(self.workers)}.log", env=self.env,
            term_group=True, append_log=True,
        ).launch()
        self.workers.append(worker)
        return worker

    def wait_workers(self, count: int, timeout: float = 120.0) -> None:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            client.wait_for_workers(count, timeout=timeout)

    def kill_workers(self) -> None:
        """SIGKILL every ``dask worker`` group (CLI, nannies, worker processes)."""
        for worker in self.workers:
            worker.kill()

    def stop(self, *, grace: float = 15.0) -> None:
        for service in [*reversed(self.workers), *([self.scheduler] if self.scheduler else [])]:
            service.stop(grace)

    def log_tail(self) -> str:
        return "\n".join(f"{s.log.name}:\n{s.log_tail()}"
                         for s in [*([self.scheduler] if self.scheduler else []), *self.workers])


def start(directory: Path, workers: int, *extra_args: str,
          env: Mapping[str, str] | None = None, timeout: float = 120.0) -> DaskCliCluster:
    """Scheduler and ``workers`` worker processes, returned once all joined."""
    cluster = DaskCliCluster(directory, env=env)
    try:
        cluster.start_scheduler()
        cluster.launch_workers(workers, *extra_args)
        cluster.wait_workers(workers, timeout)
    except Exception as exc:
        cluster.stop()
        raise RuntimeError(f"{exc}\n{cluster.log_tail()}") from exc
    except BaseException:
        cluster.stop()
        raise
    return cluster
