"""Ray: native vs ours vs wove 2.0.3's ray adapter, interleaved in one run.

The tests' Ray cluster (``ray_cluster_helpers.ray_cluster``: a CLI head with 2 CPUs,
token auth, inside a loopback-only network namespace; needs root) with this process's
driver connected serves all three sides:

- native: ``ray.get(ray.remote(add).remote(x))`` / ``ray.get([...])``;
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``ray`` executor on the already-connected driver (``init: False``;
  ``ray.remote(run).remote(payload)`` per task, the result POSTed to its callback
  server), driven warm.

    python benchmarks/bench_wove_ray.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "ray"))

from common import Side, bench_arguments, emit, hub_side, record_of, settings_of, three_way  # noqa: E402


def main() -> None:
    # No one-task-weave timing: wove's ray adapter calls ray.init per weave unless told
    # not to, and this driver is already connected; the per-weave cost is measured on
    # celery, arq and dask.
    args = bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-ray-"))
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray_cluster_helpers import ray_cluster, use_session_token

    tmp = Path(tempfile.mkdtemp(prefix="bench-wove-ray-"))
    use_session_token(tmp)  # before ray is imported

    import ray

    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all
    from wove_adapters.integration.hub import Hub
    from wove_adapters.testing.tasks import add

    record: dict[str, Any]
    with ray_cluster(tmp) as cluster:
        try:  # the hub's environment stops whatever happens
            remote_add = ray.remote(max_retries=0)(add)
            hub = Hub(environments={"ray": {"executor": "ray", "executor_config": {
                "address": cluster.address}}}, default_environment="ray")
            sides = [
                Side("native", lambda x: ray.get(remote_add.remote(x), timeout=60),
                     lambda n: ray.get([remote_add.remote(i) for i in range(n)], timeout=300)),
                hub_side(hub),
            ]
            measured, notes = three_way(sides, args, "ray", "ray", {"init": False})
            hub.close()
            record = record_of("ray", measured, **notes, settings=settings_of(
                args, cluster="1 head, 2 CPUs", return_path="http"))
        finally:
            shared_loop.run_sync(stop_all(), 60)
    shutil.rmtree(tmp, ignore_errors=True)
    emit(record)


if __name__ == "__main__":
    main()
