"""A one-node Kubernetes stand-in for the Kubernetes Jobs tests.

No API server or container runtime can run on the test machines, so the session starts
``kube_emulator.py`` (the API endpoints the ``kubernetes`` client uses for Jobs, plus a
Job controller that runs each Pod's command as a local process) on 127.0.0.1 and writes a
kubeconfig pointing at it. The adapter reads that kubeconfig with the real client and
does not know it talks to an emulator. The emulator is stopped by PID at the end.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kube_services import KubeCluster, start_cluster, stop_cluster


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeCluster]:
    try:
        cluster = start_cluster(tmp_path_factory.mktemp("kube-emulator"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    stop_cluster(cluster)
