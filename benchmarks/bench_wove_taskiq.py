"""Taskiq: native vs ours vs wove 2.0.3's taskiq adapter, interleaved in one run.

One ``taskiq worker`` (1 worker process, taskiq-redis ``ListQueueBroker`` on a fresh
queue; the broker module is ``wove_workers/wove_taskiq_broker.py``: ``bench_taskiq.py``'s
broker plus wove's worker task) serves all three sides:

- native: ``await kicker.kiq(x)`` + ``wait_result(check_interval=0.01)``;
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``taskiq`` executor (``broker.find_task("wove.run_backend_payload")
  .kiq(payload)``, result POSTed to its callback server), driven warm.

    python benchmarks/bench_wove_taskiq.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_taskiq  # noqa: E402
from common import Side, bench_arguments, emit, hub_side, record_of, settings_of, three_way  # noqa: E402


def caller_broker() -> Any:
    """A client broker on the same queue, knowing wove's task by name (the adapter looks
    it up with ``find_task``; the body never runs here)."""
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

    broker = ListQueueBroker(bench_taskiq.URL, queue_name=bench_taskiq.QUEUE).with_result_backend(
        RedisAsyncResultBackend(bench_taskiq.URL, result_ex_time=600))

    @broker.task(task_name="wove.run_backend_payload")
    async def wove_run_backend_payload(payload: dict[str, Any]) -> Any:
        raise RuntimeError("runs on the worker")

    return broker


def main() -> None:
    # No one-task-weave timing here: wove's taskiq adapter needs a started broker, and a
    # weave's runtime neither starts one nor runs on a loop a shared broker could use.
    parser = bench_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="our payload processes")
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-taskiq-"))
    workdir = Path(tempfile.mkdtemp(prefix="bench-wove-taskiq-"))
    worker = bench_taskiq.start_worker(workdir, args.processes, module="wove_taskiq_broker")
    native = None
    hub: Any = None
    broker = caller_broker()
    try:
        from wove_adapters.integration.hub import Hub

        native = bench_taskiq.Native()
        hub = Hub(environments={"tq": {"executor": "taskiq", "executor_config": {
            "url": bench_taskiq.URL, "queue": bench_taskiq.QUEUE}}}, default_environment="tq")
        sides = [Side("native", native.one, native.many), hub_side(hub)]
        measured, notes = three_way(
            sides, args, "taskiq", "taskiq", {"broker": broker},
            on_start=lambda wove: wove.call(broker.startup()),
            on_close=lambda wove: wove.call(broker.shutdown()))
    finally:
        if hub is not None:
            hub.close()
        if native is not None:
            native.close()
        bench_taskiq.stop_worker(worker)
    emit(record_of("taskiq", measured, **notes,
                   settings=settings_of(args, worker_processes=1,
                                        payload_processes=args.processes,
                                        check_interval_s=0.01)))


if __name__ == "__main__":
    main()
