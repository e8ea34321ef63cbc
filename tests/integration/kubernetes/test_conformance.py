"""The Kubernetes Jobs adapter passes the conformance suite, through the real
``kubernetes`` client, against the one-node API emulator (see conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from kube_services import CAPACITY, KubeCluster


class TestKubernetesJobsConformance(BackendConformance):
    executor = "kubernetes_jobs"
    service = "kube_cluster"
    slots = CAPACITY  # Pods beyond the node's capacity wait Pending: a real queue

    def executor_config(self, service: KubeCluster) -> dict[str, Any]:
        return service.config()

    def test_wove_weave_maps_100_items(self, environment: dict[str, Any]) -> None:
        """With an array window, the weave's 100 mapped items go as one Indexed Job."""
        from wove_adapters.integration import environments

        def jobs_created() -> int:
            return sum(d.transport.adapter.submissions  # type: ignore[attr-defined]
                       for d in list(environments._dispatchers.values())
                       if getattr(d.transport, "name", "") == "kubernetes_jobs")

        batched = {**environment,
                   "executor_config": {**environment["executor_config"], "array_window": 0.5}}
        before = jobs_created()
        super().test_wove_weave_maps_100_items(batched)
        assert jobs_created() - before == 1, "100 mapped items should be one Indexed Job"
