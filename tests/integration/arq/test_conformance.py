"""The shared conformance suite against a real Redis and a real ``arq`` CLI worker, once
per isolation mode: ``thread`` (the default; running work cannot be interrupted, so the
suite checks that require_ack is refused) and ``process`` (aborts really stop work)."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from arq_services import ArqWorker, environment

from wove_adapters.testing import AdapterConformance

_WORKER: dict[str, ArqWorker] = {}


class TestArqConformance(AdapterConformance):
    # The worker polls every 10 ms; reconciliation every 2 s. Generous for a shared box.
    detection_timeout = 60.0
    isolation = "thread"
    extra = "arq"
    library = ("arq",)

    @pytest.fixture
    def environment(self, arq_worker: ArqWorker) -> dict[str, Any]:
        _WORKER["main"] = arq_worker
        return environment(isolation=self.isolation)

    @pytest.fixture
    def worker_slots(self) -> int:
        return 4  # WorkerSettings.max_jobs

    def kill_worker(self, pid: int) -> None:
        """Thread isolation: the task's pid is the arq worker itself, so SIGKILL takes the
        whole worker down; start a fresh one (as a supervisor would) for the requeue."""
        os.kill(pid, signal.SIGKILL)
        worker = _WORKER["main"]
        if pid == worker.pid:
            worker.restart()

    def check_weave_pids(self, pids: set[int]) -> None:
        """Thread isolation runs every item in the one arq worker process."""
        if self.isolation == "thread":
            assert pids == {_WORKER["main"].pid}
        else:
            super().check_weave_pids(pids)


class TestArqProcessConformance(TestArqConformance):
    """``isolation="process"``: the task's pid is its child process; the worker lives."""

    isolation = "process"
