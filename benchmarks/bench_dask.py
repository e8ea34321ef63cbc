"""Dask: native ``Client.submit`` + ``result`` vs ours (``Hub.run`` / ``Hub.map``), on both
of our return paths (callback receiver ``http`` and Dask future ``native``).

Starts its own ``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1`` on 127.0.0.1
(allowed-failures=0, dashboards on 127.0.0.1:0), measures interleaved rounds, stops them
by process group, and prints one JSON line per return path plus a summary line:

    python benchmarks/bench_dask.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))
import dask_cli


def add_one(x: int) -> int:
    return x + 1


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_cluster(tmp: Path) -> tuple[str, dask_cli.DaskCliCluster]:
    """Scheduler + 2 worker processes from Dask's CLI (``tests/support/dask_cli.py``)."""
    cluster = dask_cli.start(tmp, 2)
    return cluster.address, cluster


def stop(cluster: dask_cli.DaskCliCluster) -> None:
    cluster.stop()


def native_round(client: Any, seq: int, burst: int) -> tuple[list[float], float]:
    samples = []
    for i in range(seq):
        start = time.perf_counter()
        assert client.submit(add_one, i, pure=False).result() == i + 1
        samples.append(time.perf_counter() - start)
    start = time.perf_counter()
    futures = client.map(add_one, range(burst), pure=False)
    assert client.gather(futures) == [i + 1 for i in range(burst)]
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
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-dask-"))

    from distributed import Client

    from wove_adapters.integration.hub import Hub

    tmp = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    address, cluster = start_cluster(tmp)
    try:
        client = Client(address, timeout=30)
        client.wait_for_workers(2, timeout=120)
        # "native+direct": the caller fetches results from the workers itself
        # (client_options direct_to_workers), not through the scheduler.
        configs = {
            "http": {"return_path": "http"},
            "native": {"return_path": "native"},
            "native+direct": {"return_path": "native",
                              "client_options": {"direct_to_workers": True}},
        }
        paths = tuple(configs)
        hubs = {
            path: Hub(environments={"dask": {"executor": "dask", "executor_config": {
                "address": address, **config}}}, default_environment="dask")
            for path, config in configs.items()
        }
        # Warm up: connections, imports on the workers, receiver.
        native_round(client, 20, 50)
        for hub in hubs.values():
            ours_round(hub, 20, 50)
        # "baseline": Dask's own submit + result; the others: ours, per return path.
        samples: dict[str, list[float]] = {"baseline": [], **{p: [] for p in paths}}
        rates: dict[str, list[float]] = {"baseline": [], **{p: [] for p in paths}}
        for _ in range(options.rounds):
            s, r = native_round(client, options.seq, options.burst)
            samples["baseline"] += s
            rates["baseline"].append(r)
            for path, hub in hubs.items():
                s, r = ours_round(hub, options.seq, options.burst)
                samples[path] += s
                rates[path].append(r)
        native = summary(samples["baseline"], rates["baseline"])
        results = {}
        for path in paths:
            ours = summary(samples[path], rates[path])
            results[path] = ours
            print(json.dumps({
                "backend": "dask", "return_path": path, "native": native, "ours": ours,
                "ratio_p50": round(ours["p50_ms"] / native["p50_ms"], 2),
                "ratio_throughput": round(ours["throughput_per_s"] / native["throughput_per_s"], 2),
            }))
        for hub in hubs.values():
            hub.close()
        client.close()
    finally:
        from wove_adapters.core import loop as shared_loop
        from wove_adapters.integration.environments import stop_all

        shared_loop.run_sync(stop_all(), 60)
        stop(cluster)


if __name__ == "__main__":
    main()
