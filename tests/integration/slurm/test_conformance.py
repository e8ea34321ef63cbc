"""The Slurm adapter passes the conformance suite on a real one-node cluster."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance


class TestSlurmConformance(BackendConformance):
    executor = "slurm"
    service = "slurm_cluster"
    slots = 8  # CPUs=8 in the test cluster's node definition, one CPU per job
