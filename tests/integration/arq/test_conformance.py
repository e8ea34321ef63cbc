"""The shared conformance suite against a real Redis and a real ``arq`` CLI worker, once
per isolation mode: ``thread`` (the default; running work cannot be interrupted, so the
suite checks that require_ack is refused) and ``process`` (aborts really stop work)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from arq_services import ArqWorker, environment
from backend_conformance import BackendConformance

_WORKER: dict[str, ArqWorker] = {}


class TestArqConformance(BackendConformance):
    executor = "arq"
    service = "arq_worker"
    isolation = "thread"
    slots = 4  # WorkerSettings.max_jobs

    def executor_config(self, service: ArqWorker) -> dict[str, Any]:
        _WORKER["main"] = service
        config: dict[str, Any] = environment(isolation=self.isolation)["executor_config"]
        return config

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
