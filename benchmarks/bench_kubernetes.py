"""Kubernetes Jobs (the API emulator of the tests; every Pod a real local process):
native Jobs through the ``kubernetes`` client vs ours (``Hub.run`` / ``Hub.map``).

- sequential round trips, native and ours taking turns sample by sample: a native Job
  runs ``python -c 'print(x + 1)'``; it is done when ``read_namespaced_job`` (polled every
  ``--poll`` seconds) shows the Complete condition, and its result is read from the Pod's
  log. Ours runs ``x + 1`` through ``python -m wove_adapters.worker`` and the result comes
  back over HTTP;
- a burst of N tasks at once: native is one Indexed Job of N completions (each Pod
  prints ``JOB_COMPLETION_INDEX + 1``; results from N Pod logs once the Job is Complete);
  ours is ``Hub.map`` (one Indexed Job too);
- 100 mapped items as one Indexed Job vs 100 separate Jobs (ours).

Starts its own emulator (``tests/integration/kubernetes/kube_services.py``), stops it by
PID, and prints one JSON line:

    python benchmarks/bench_kubernetes.py [--seq 200] [--burst 1000] [--rounds 1]
                                          [--capacity 8] [--poll 0.05]

Every task is a process start on the emulated node (``--capacity`` at once), so absolute
numbers say more about this 2-core machine than about a cluster; the comparison (same
node, same Pod start path) is what matters.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "integration" / "kubernetes"))
sys.path.insert(0, str(ROOT / "benchmarks"))

os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-k8s-"))

import common  # noqa: E402
import kube_services as services  # noqa: E402

PLUS_ONE = "import sys; print(int(sys.argv[1]) + 1)"
INDEX_PLUS_ONE = "import os; print(int(os.environ['JOB_COMPLETION_INDEX']) + 1)"


def add_one(x: int) -> int:
    """Ours runs this (pickled by value: the worker imports nothing for it, as the native
    ``python -c`` imports nothing; ``wove_adapters.testing.tasks`` would import pytest)."""
    return x + 1


class Native:
    """The backend's own path with the official client: create a Job, poll it until it is
    Complete, read the answer from its Pod's log."""

    def __init__(self, cluster: services.KubeCluster, poll: float) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=cfg)
        cfg.connection_pool_maxsize = 16
        self.api = client.ApiClient(cfg)
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.poll = poll
        self.namespace = services.NAMESPACE
        self.submissions = 0

    def _job(self, name: str, args: list[str], completions: int | None = None) -> dict[str, Any]:
        container = {"name": "main", "image": "python:3.11-slim",
                     "command": [sys.executable, "-c", *args]}
        spec: dict[str, Any] = {
            "backoffLimit": 0, "ttlSecondsAfterFinished": 60,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container]}},
        }
        if completions is not None:
            del spec["backoffLimit"]
            spec.update(completionMode="Indexed", completions=completions,
                        parallelism=completions, backoffLimitPerIndex=0)
        return {"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "labels": {"bench": "native"}}, "spec": spec}

    def _wait_complete(self, name: str) -> None:
        while True:
            job = self.batch.read_namespaced_job(name, self.namespace)
            for condition in job.status.conditions or []:
                if condition.status == "True" and condition.type == "Complete":
                    return
                if condition.status == "True" and condition.type == "Failed":
                    raise RuntimeError(f"native Job {name} failed: {condition.message}")
            time.sleep(self.poll)

    def _logs(self, name: str) -> dict[int | None, str]:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"job-name={name}")
        out: dict[int | None, str] = {}
        for pod in pods.items:
            if pod.status.phase != "Succeeded":
                continue
            raw = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index")
            out[int(raw) if raw is not None else None] = self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace)
        return out

    def _delete(self, name: str) -> None:
        self.batch.delete_namespaced_job(name, self.namespace, propagation_policy="Background")

    def one(self, x: int) -> int:
        name = f"native-{uuid.uuid4().hex[:10]}"
        self.batch.create_namespaced_job(self.namespace, self._job(name, [PLUS_ONE, str(x)]))
        self.submissions += 1
        self._wait_complete(name)
        value = int(self._logs(name)[None].strip())
        self._delete(name)
        return value

    def burst(self, n: int) -> list[int]:
        name = f"native-burst-{uuid.uuid4().hex[:8]}"
        self.batch.create_namespaced_job(
            self.namespace, self._job(name, [INDEX_PLUS_ONE], completions=n)
        )
        self.submissions += 1
        self._wait_complete(name)
        logs = self._logs(name)
        self._delete(name)
        return [int(logs[i].strip()) for i in range(n)]


def mapped_comparison(hub: Any, items: int = 100) -> dict[str, Any]:
    """100 mapped items: one Indexed Job (ours, batched) vs 100 Jobs (a key per item)."""
    add = add_one

    def adapter(environment: str) -> Any:
        return hub.dispatcher(environment).transport.adapter

    before = adapter("k8s").submissions
    start = time.perf_counter()
    assert hub.map(add, range(items), environment="k8s") == [i + 1 for i in range(items)]
    indexed_s = time.perf_counter() - start
    indexed_jobs = adapter("k8s").submissions - before
    before = adapter("k8s-keyed").submissions
    start = time.perf_counter()
    assert hub.map(add, range(items), environment="k8s-keyed") == [i + 1 for i in range(items)]
    single_s = time.perf_counter() - start
    return {"items": items,
            "indexed_job": {"submissions": indexed_jobs, "seconds": round(indexed_s, 2)},
            "separate_jobs": {"submissions": adapter("k8s-keyed").submissions - before,
                              "seconds": round(single_s, 2)}}


def main() -> None:
    parser = common.speed_arguments(__doc__.splitlines()[0], rounds=1)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--capacity", type=int, default=8, help="Pods the node runs at once")
    parser.add_argument("--poll", type=float, default=0.05, help="native status poll, seconds")
    args = parser.parse_args()
    services.CAPACITY = args.capacity
    from wove_adapters import Hub

    state = Path(tempfile.mkdtemp(prefix="wove-bench-kube-"))
    cluster = services.start_cluster(state)
    common.log(f"emulator at {cluster.url} (capacity {args.capacity})")
    try:
        config = cluster.config()
        keyed = {"executor": "kubernetes_jobs", "executor_config": config,
                 "delivery_idempotency_key": uuid.uuid4().hex[:8] + "-{x}"}
        hub = Hub(environments={"k8s": {"executor": "kubernetes_jobs", "executor_config": config},
                                "k8s-keyed": keyed}, default_environment="k8s")
        native = Native(cluster, args.poll)
        sides = [common.Side("native", native.one, native.burst),
                 common.hub_side(hub, "k8s", fn=add_one)]
        measured = common.interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=args.warmup, label="kubernetes")
        mapped = mapped_comparison(hub)
        hub.close()
        common.emit(common.two_way_record(
            "kubernetes_jobs", measured,
            mapped_100=mapped,
            settings=common.settings_of(args, capacity=args.capacity, poll_s=args.poll),
            machine=common.machine(),
            versions=common.versions(("wove-adapters", "kubernetes", "aiohttp", "cloudpickle")),
        ))
    finally:
        services.stop_cluster(cluster)


if __name__ == "__main__":
    main()
