"""Ray: native ``f.remote()`` + ``ray.get`` vs ours (``Hub.run`` / ``Hub.map``), on both of
our return paths (callback receiver ``http`` and ObjectRef ``native``).

Starts what the tests start (``tests/integration/ray/ray_cluster_helpers.py``): a Ray head
with 2 CPUs from Ray's own CLI, token authentication with a throwaway token, everything
inside a loopback-only network namespace (needs root; Ray would otherwise advertise the
machine's eth0 address), with this process's driver connected. Measures interleaved
rounds, stops the head by PID, and prints one JSON line per return path. ``Hub.map`` with
chunking (``map_chunk_size="auto"``, on the http path) bursts in the same rounds and is
reported in the http line (``ours_chunked``); each side's bursts report CPU per task
(the worker side: everything the head started, GCS and raylet included):

    python benchmarks/bench_ray.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "ray"))

import common  # noqa: E402

from wove_adapters.testing.tasks import add as add_one  # noqa: E402  (x + 1, importable)


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0])
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
            # "baseline": Ray's own remote + get; the others: ours, per return path.
            # "chunked": ours on the http path with map_chunk_size="auto" (bursts only).
            cpu = common.CpuMeter(options.burst, lambda: [cluster.head.pid])
            sides = common.metered_sides(cpu, hubs, add_one, baseline=(
                lambda x: ray.get(remote_add.remote(x)),
                lambda n: ray.get([remote_add.remote(i) for i in range(n)])))
            # Warm up: worker processes, imports on the workers, receiver connections.
            common.take_turns(sides, seq=20, burst=100, rounds=1)
            common.emit_paths("ray", common.take_turns(sides, seq=options.seq, burst=options.burst,
                                         rounds=options.rounds), chunked="chunked", cpu=cpu)
            for hub in hubs.values():
                hub.close()
        finally:
            shared_loop.run_sync(stop_all(), 60)
    shutil.rmtree(tmp, ignore_errors=True)
    if own_home:
        shutil.rmtree(os.environ["WOVE_ADAPTERS_HOME"], ignore_errors=True)


if __name__ == "__main__":
    main()
