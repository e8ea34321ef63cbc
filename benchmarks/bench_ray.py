"""Ray: native ``f.remote()`` + ``ray.get`` vs ours (``Hub.run`` / ``Hub.map``), on both of
our return paths (callback receiver ``http`` and ObjectRef ``native``).

Starts what the tests start (``tests/integration/ray/ray_cluster_helpers.py``): a Ray head
with 2 CPUs from Ray's own CLI, token authentication with a throwaway token, everything
inside a loopback-only network namespace (needs root; Ray would otherwise advertise the
machine's eth0 address), with this process's driver connected. Measures interleaved
rounds, stops the head by PID, and prints one JSON line per return path:

    python benchmarks/bench_ray.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration" / "ray"))

from wove_adapters.testing.tasks import add as add_one  # x + 1, importable by workers


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def native_round(remote_add: Any, seq: int, burst: int) -> tuple[list[float], float]:
    import ray

    samples = []
    for i in range(seq):
        start = time.perf_counter()
        assert ray.get(remote_add.remote(i)) == i + 1
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    refs = [remote_add.remote(i) for i in range(burst)]
    assert ray.get(refs) == [i + 1 for i in range(burst)]
    return samples, burst / (time.perf_counter() - start)


def ours_round(hub: Any, seq: int, burst: int) -> tuple[list[float], float]:
    samples = []
    for i in range(seq):
        start = time.perf_counter()
        assert hub.run(add_one, i) == i + 1
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    assert hub.map(add_one, range(burst)) == [i + 1 for i in range(burst)]
    return samples, burst / (time.perf_counter() - start)


def summary(samples: list[float], rates: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(samples) * 1000, 2),
        "p99_ms": round(percentile(samples, 0.99) * 1000, 2),
        "throughput_per_s": round(statistics.median(rates), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    own_home = "WOVE_ADAPTERS_HOME" not in os.environ
    if own_home:
        os.environ["WOVE_ADAPTERS_HOME"] = tempfile.mkdtemp(prefix="wove-bench-ray-")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

    from ray_cluster_helpers import ray_cluster, use_session_token

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    use_session_token(tmp)  # before ray is imported

    import ray

    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all
    from wove_adapters.integration.hub import Hub

    with ray_cluster(tmp) as cluster:
        try:
            remote_add = ray.remote(max_retries=0)(add_one)
            paths = ("http", "native")
            hubs = {
                path: Hub(environments={"ray": {"executor": "ray", "executor_config": {
                    "address": cluster.address, "return_path": path}}},
                    default_environment="ray")
                for path in paths
            }
            # Warm up: worker processes, imports on the workers, receiver connections.
            native_round(remote_add, 20, 100)
            for hub in hubs.values():
                ours_round(hub, 20, 100)
            # "baseline": Ray's own remote + get; the others: ours, per return path.
            samples: dict[str, list[float]] = {"baseline": [], **{p: [] for p in paths}}
            rates: dict[str, list[float]] = {"baseline": [], **{p: [] for p in paths}}
            for _ in range(options.rounds):
                s, r = native_round(remote_add, options.seq, options.burst)
                samples["baseline"] += s
                rates["baseline"].append(r)
                for path, hub in hubs.items():
                    s, r = ours_round(hub, options.seq, options.burst)
                    samples[path] += s
                    rates[path].append(r)
            native = summary(samples["baseline"], rates["baseline"])
            for path in paths:
                ours = summary(samples[path], rates[path])
                print(json.dumps({
                    "backend": "ray", "return_path": path, "native": native, "ours": ours,
                    "ratio_p50": round(ours["p50_ms"] / native["p50_ms"], 2),
                    "ratio_throughput": round(
                        ours["throughput_per_s"] / native["throughput_per_s"], 2),
                }), flush=True)
            for hub in hubs.values():
                hub.close()
        finally:
            shared_loop.run_sync(stop_all(), 60)
    shutil.rmtree(tmp, ignore_errors=True)
    if own_home:
        shutil.rmtree(os.environ["WOVE_ADAPTERS_HOME"], ignore_errors=True)


if __name__ == "__main__":
    main()
