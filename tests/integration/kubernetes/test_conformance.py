"""The Kubernetes Jobs adapter passes the conformance suite, through the real
``kubernetes`` client, against the one-node API emulator (see conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from kube_services import CAPACITY, KubeCluster

from wove_adapters.testing import AdapterConformance


class TestKubernetesJobsConformance(AdapterConformance):
    detection_timeout = 90.0

    @pytest.fixture
    def environment(self, kube_cluster: KubeCluster) -> dict[str, Any]:
        return {"executor": "kubernetes_jobs", "executor_config": kube_cluster.config()}

    @pytest.fixture
    def worker_slots(self) -> int:
        return CAPACITY  # Pods beyond the node's capacity wait Pending: a real queue
