"""The shared conformance suite against a real Redis and a real ``rq worker`` process."""

from __future__ import annotations

from typing import Any

import pytest

from wove_adapters.testing import AdapterConformance


class TestRqConformance(AdapterConformance):
    # A killed work-horse is marked failed by its worker at once; reconciliation polls
    # every second. Generous, for a machine shared with other test runs.
    detection_timeout = 45.0

    @pytest.fixture
    def environment(self, rq_environment: dict[str, Any]) -> dict[str, Any]:
        return rq_environment

    @pytest.fixture
    def worker_slots(self) -> int:
        return 1  # one forking rq worker: one job at a time

    # kill_worker: the default SIGKILLs the pid the task reported, which is the RQ
    # work-horse (the worker itself survives and marks the job failed).
