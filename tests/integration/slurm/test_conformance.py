"""The Slurm adapter passes the conformance suite on a real one-node cluster."""

from __future__ import annotations

from typing import Any

import pytest

from wove_adapters.testing import AdapterConformance


class TestSlurmConformance(AdapterConformance):
    detection_timeout = 60.0

    @pytest.fixture
    def environment(self, slurm_cluster: dict[str, Any]) -> dict[str, Any]:
        return {"executor": "slurm", "executor_config": dict(slurm_cluster)}

    @pytest.fixture
    def worker_slots(self) -> int:
        return 8  # CPUs=8 in the test cluster's node definition, one CPU per job
