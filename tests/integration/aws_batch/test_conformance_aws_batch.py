"""The AWS Batch adapter passes the conformance suite against moto (server mode), whose
jobs really run through the Docker Engine API shim."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance


class TestAwsBatchConformance(BackendConformance):
    executor = "aws_batch"
    service = "batch_config"
    # moto starts every job at once (no capacity queue in RUNNABLE): cancel-queued is
    # exercised right after submission, while the job is SUBMITTED/PENDING.
    slots = 0
