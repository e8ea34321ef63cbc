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

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "kubernetes"))

from common import bench_arguments, emit, wove_attempt, wove_attempt_record  # noqa: E402


def main() -> None:
    bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-k8s-"))
    from kube_services import NAMESPACE, start_cluster, stop_cluster

    cluster = start_cluster(Path(tempfile.mkdtemp(prefix="bench-wove-k8s-")))
    try:
        failure = wove_attempt("kubernetes_jobs", {
            "load_config_options": {"config_file": str(cluster.kubeconfig)},
            "namespace": NAMESPACE,
            "image": "ghcr.io/example/wove-worker:py3.11",
        }, timeout=60)
    finally:
        stop_cluster(cluster)
    emit(wove_attempt_record("kubernetes_jobs", "kubernetes_jobs", failure))


if __name__ == "__main__":
    main()
