"""Temporal: native vs ours vs wove 2.0.3's temporal adapter, interleaved in one run.

A dev server (``temporal server start-dev``, in memory, 127.0.0.1) and one worker process
(``wove_workers/wove_temporal_worker.py``: the tests' worker plus a one-activity workflow
for wove's payloads, ``--max-concurrent`` activity slots) serve all three sides:

- native: ``client.execute_workflow("user.Increment", x)`` (one workflow, one activity);
  bursts keep at most ``--concurrency`` runs in flight on every side, as
  ``bench_temporal.py`` does, and wait until the server has closed the previous
  side's workflows;
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``temporal`` executor (``start_workflow("wove.RunBackendPayload",
  payload)``, the result POSTed to its callback server), driven warm.

    python benchmarks/bench_wove_temporal.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "temporal"))
os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-temporal-"))

from bench_temporal import Native  # noqa: E402
from common import (  # noqa: E402
    Side,
    bench_arguments,
    emit,
    hub_side,
    record_of,
    settings_of,
    three_way,
)
from temporal_services import start_dev_server, start_worker  # noqa: E402


def main() -> None:
    parser = bench_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=100,
                        help="the worker's max_concurrent_activities")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="runs in flight during a burst, every side (0: all at once), "
                             "as bench_temporal.py: the in-memory dev server on a loaded "
                             "2-core host collapses under 1000 concurrent starts")
    args = parser.parse_args()
    from wove_adapters.integration.hub import Hub

    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE / "wove_workers"), *filter(None, [os.environ.get("PYTHONPATH")])])
    work = Path(tempfile.mkdtemp(prefix="bench-wove-temporal-"))
    server = start_dev_server(work / "server")
    queue = f"wove-bench-temporal-{uuid.uuid4().hex[:8]}"
    worker = start_worker(server.address, queue, work / "worker.log",
                          module="wove_temporal_worker",
                          args=["--max-concurrent", str(args.slots)])
    hub: Any = None
    try:
        native = Native(server.address, queue)
        concurrency = args.concurrency or args.burst
        hub = Hub(environments={"temporal": {
            "executor": "temporal",
            "executor_config": {"address": server.address, "task_queue": queue},
            "workers": concurrency,  # Hub.map's in-flight bound
        }}, default_environment="temporal")

        # Before each burst (untimed): the previous side's workflows are closed.
        ours = hub_side(hub)
        ours.before_burst = native.drain
        sides = [Side("native", native.run, lambda n: native.burst(n, concurrency),
                      before_burst=native.drain), ours]
        measured, notes = three_way(
            sides, args, "temporal", "temporal",
            {"target_host": server.address, "workflow": "wove.RunBackendPayload",
             "task_queue": queue},
            workers=concurrency, before_burst=native.drain)
    finally:
        if hub is not None:
            hub.close()
        worker.stop()
        server.stop()
    emit(record_of("temporal", measured, **notes, settings=settings_of(
        args, worker_slots=args.slots, return_path="http",
        burst_concurrency=args.concurrency or args.burst,
        native="workflow + one activity (user.Increment)",
        wove_workflow="workflow + one activity running wove's payload")))


if __name__ == "__main__":
    main()
