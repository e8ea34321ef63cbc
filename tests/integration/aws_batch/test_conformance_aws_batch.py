"""The AWS Batch adapter passes the conformance suite against moto (server mode), whose
jobs really run through the Docker Engine API shim."""

from __future__ import annotations

from typing import Any

import pytest

from wove_adapters.testing import AdapterConformance


class TestAwsBatchConformance(AdapterConformance):
    detection_timeout = 60.0
    extra = "aws"
    library = ("boto3",)

    @pytest.fixture
    def environment(self, batch_config: dict[str, Any]) -> dict[str, Any]:
        return {"executor": "aws_batch", "executor_config": batch_config}

    @pytest.fixture
    def worker_slots(self) -> int:
        # moto starts every job at once (no capacity queue in RUNNABLE): cancel-queued is
        # exercised right after submission, while the job is SUBMITTED/PENDING.
        return 0
