"""The Kubernetes Jobs adapter passes the conformance suite, through the real
``kubernetes`` client, against the one-node API emulator (see conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kube_services import CAPACITY, KubeCluster

from wove_adapters.testing import AdapterConformance


class TestKubernetesJobsConformance(AdapterConformance):
    detection_timeout = 90.0
    extra = "kubernetes"
    library = ("kubernetes",)

    @pytest.fixture
    def environment(self, kube_cluster: KubeCluster) -> dict[str, Any]:
        return {"executor": "kubernetes_jobs", "executor_config": kube_cluster.config()}

    @pytest.fixture
    def worker_slots(self) -> int:
        return CAPACITY  # Pods beyond the node's capacity wait Pending: a real queue

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
