"""The Taskiq adapter passes the shared conformance suite against a real ``taskiq worker``
(taskiq-redis ``ListQueueBroker`` on the local Redis)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from taskiq_fixtures import SLOTS, TaskiqWorker


class TestTaskiqConformance(BackendConformance):
    executor = "taskiq"
    service = "taskiq_worker"
    slots = SLOTS

    def executor_config(self, service: TaskiqWorker) -> dict[str, Any]:
        self._worker = service  # kill_worker checks the task ran under it
        return service.config

    def kill_worker(self, pid: int) -> None:
        """SIGKILL the taskiq worker process running the task (worker -> its pool's
        zygote -> payload process: both die with it); the CLI's process manager starts a
        fresh worker, as in production."""

        def parent_of(child: int) -> int:
            return int(open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[1])

        worker = parent_of(parent_of(pid))
        assert worker in self._worker.worker_pids(), "the task did not run under our worker"
        os.kill(worker, signal.SIGKILL)
