"""Dask: native vs ours vs wove 2.0.3's dask adapter, interleaved in one run.

``bench_dask.py``'s cluster (``dask scheduler`` + ``dask worker --nworkers 2 --nthreads
1`` on 127.0.0.1, stopped by process group) serves all three sides:

- native: ``client.submit(add, x, pure=False).result()`` / ``client.map`` + ``gather``;
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``dask`` executor given the same ``Client`` (``client.submit(run,
  payload, key=<run id>)``, the result POSTed to its callback server), driven warm.

    python benchmarks/bench_wove_dask.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dask import start_cluster, stop  # noqa: E402
from common import Side, bench_arguments, emit, hub_side, record_of, settings_of, three_way  # noqa: E402


def main() -> None:
    args = bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-dask-"))
    from distributed import Client

    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all
    from wove_adapters.integration.hub import Hub
    from wove_adapters.testing.tasks import add

    address, cluster = start_cluster(Path(tempfile.mkdtemp(prefix="bench-wove-dask-")))
    try:
        client = Client(address, timeout=30)
        client.wait_for_workers(2, timeout=120)
        wove_client = Client(address, timeout=30)
        hub = Hub(environments={"dask": {"executor": "dask", "executor_config": {
            "address": address}}}, default_environment="dask")
        sides = [
            Side("native", lambda x: client.submit(add, x, pure=False).result(60),
                 lambda n: client.gather(client.map(add, range(n), pure=False))),
            hub_side(hub),
        ]
        measured, notes = three_way(sides, args, "dask", "dask", {"client": wove_client},
                                    weave=True, weave_config={"address": address})
        hub.close()
        wove_client.close()
        client.close()
    finally:
        shared_loop.run_sync(stop_all(), 60)
        stop(cluster)
    emit(record_of("dask", measured, **notes,
                   settings=settings_of(args, workers="2 processes x 1 thread",
                                        return_path="http")))


if __name__ == "__main__":
    main()
