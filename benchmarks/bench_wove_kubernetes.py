"""Kubernetes Jobs: can wove 2.0.3's kubernetes_jobs adapter run a task at all, against
the tests' Kubernetes API emulator (``tests/integration/kubernetes/kube_services.py``,
which validates objects the way the API server does)?

wove's adapter creates a Job named ``wove-<sanitised run id>`` whose Pod template carries
the label ``wove-run-id: <run id>``; its run id is ``<task>:<hex>``, and ``:`` is not
allowed in a label value. This script sends one task through wove's adapter (kubeconfig
of the emulator, the same image string the tests use) and prints one JSON line with the
outcome. If wove's adapter ever runs, the figures belong next to ``bench_kubernetes.py``'s.

    python benchmarks/bench_wove_kubernetes.py
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import attempt_once  # the harness, beside this script

TESTS = Path(__file__).resolve().parents[1] / "tests" / "integration"
sys.path.insert(0, str(TESTS / "kubernetes"))


@contextlib.contextmanager
def emulator(workdir: Path) -> Iterator[dict[str, Any]]:
    """The tests' Kubernetes API emulator; wove's config for it (its kubeconfig, the
    image string the tests use)."""
    from kube_services import NAMESPACE, start_cluster, stop_cluster

    cluster = start_cluster(workdir)
    try:
        yield {
            "load_config_options": {"config_file": str(cluster.kubeconfig)},
            "namespace": NAMESPACE,
            "image": "ghcr.io/example/wove-worker:py3.11",
        }
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    attempt_once("kubernetes_jobs", __doc__, emulator)
