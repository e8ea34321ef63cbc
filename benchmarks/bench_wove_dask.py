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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_dask import start_cluster, stop  # noqa: E402
from common import (  # noqa: E402
    Side,
    WoveRuntime,
    bench_arguments,
    emit,
    hub_side,
    interleave,
    log,
    record_of,
    weave_round_trip,
)


def main() -> None:
    args = bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-dask-"))
    from distributed import Client

    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all
    from wove_adapters.integration.hub import Hub
    from wove_adapters.testing.tasks import add

    address, cluster = start_cluster(Path(tempfile.mkdtemp(prefix="bench-wove-dask-")))
    wove: WoveRuntime | None = None
    wove_note: str | None = None
    weave: dict[str, Any] | None = None
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
        try:
            wove = WoveRuntime("dask", {"client": wove_client})
            sides.append(wove.side())
        except Exception as exc:
            wove_note = f"wove's dask executor did not start: {type(exc).__name__}: {exc}"
        measured = interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=args.warmup, label="dask")
        if wove is not None and args.weave_samples:
            wove.close()
            wove = None
            log("timing one-task wove weaves")
            try:
                weave = weave_round_trip({"executor": "dask",
                                          "executor_config": {"address": address}},
                                         args.weave_samples)
            except Exception as exc:
                weave = {"error": f"{type(exc).__name__}: {exc}"}
        hub.close()
        wove_client.close()
        client.close()
    finally:
        if wove is not None:
            wove.close()
        shared_loop.run_sync(stop_all(), 60)
        stop(cluster)
    emit(record_of("dask", measured, wove_note=wove_note, wove_weave_per_task=weave,
                   settings={"seq": args.seq, "burst": args.burst, "rounds": args.rounds,
                             "workers": "2 processes x 1 thread", "return_path": "http"}))


if __name__ == "__main__":
    main()
