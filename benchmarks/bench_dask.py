"""Dask: native ``Client.submit`` + ``result`` vs ours (``Hub.run`` / ``Hub.map``), on both
of our return paths (callback receiver ``http`` and Dask future ``native``).

Starts its own ``dask scheduler`` + ``dask worker --nworkers 2 --nthreads 1`` on 127.0.0.1
(allowed-failures=0, dashboards on 127.0.0.1:0), measures interleaved rounds, stops them
by process group, and prints one JSON line per return path. ``Hub.map`` with chunking
(``map_chunk_size="auto"``, on the http path) bursts in the same rounds and is reported
in the http line (``ours_chunked``); each side's bursts report CPU per task too:

    python benchmarks/bench_dask.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
import common  # noqa: E402
import dask_cli  # noqa: E402


def add_one(x: int) -> int:
    return x + 1


def start_cluster(tmp: Path) -> tuple[str, dask_cli.DaskCliCluster]:
    """Scheduler + 2 worker processes from Dask's CLI (``tests/support/dask_cli.py``)."""
    cluster = dask_cli.start(tmp, 2)
    return cluster.address, cluster


def stop(cluster: dask_cli.DaskCliCluster) -> None:
    cluster.stop()


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0])
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
        hubs = {
            path: Hub(environments={"dask": {"executor": "dask", "executor_config": {
                "address": address, **config}}}, default_environment="dask")
            for path, config in configs.items()
        }
        # "baseline": Dask's own submit + result; the others: ours, per return path.
        # "chunked": ours on the http path with map_chunk_size="auto" (bursts only).
        cpu = common.CpuMeter(options.burst, lambda: [
            s.pid for s in [cluster.scheduler, *cluster.workers] if s is not None])
        sides = common.metered_sides(cpu, hubs, add_one, baseline=(
            lambda x: client.submit(add_one, x, pure=False).result(),
            lambda n: client.gather(client.map(add_one, range(n), pure=False))))
        # Warm up: connections, imports on the workers, receiver.
        common.take_turns(sides, seq=20, burst=50, rounds=1)
        measured = common.take_turns(sides, seq=options.seq, burst=options.burst,
                                     rounds=options.rounds)
        common.emit_paths("dask", measured, chunked="chunked", cpu=cpu)
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
