"""The Taskiq adapter passes the shared conformance suite against a real ``taskiq worker``
(taskiq-redis ``ListQueueBroker`` on the local Redis)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from taskiq_fixtures import SLOTS, TaskiqWorker

from wove_adapters.testing import AdapterConformance


class TestTaskiqConformance(AdapterConformance):
    detection_timeout = 60.0
    extra = "taskiq"
    library = ("taskiq",)

    @pytest.fixture
    def environment(self, taskiq_worker: TaskiqWorker) -> dict[str, Any]:
        self._worker = taskiq_worker
        return {"executor": "taskiq", "executor_config": taskiq_worker.config}

    @pytest.fixture
    def worker_slots(self) -> int:
        return SLOTS

    def kill_worker(self, pid: int) -> None:
        """SIGKILL the taskiq worker process running the task (worker -> its pool's
        zygote -> payload process: both die with it); the CLI's process manager starts a
        fresh worker, as in production."""

        def parent_of(child: int) -> int:
            return int(open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[1])

        worker = parent_of(parent_of(pid))
        assert worker in self._worker.worker_pids(), "the task did not run under our worker"
        os.kill(worker, signal.SIGKILL)
