"""Temporal: native ``execute_workflow`` (one workflow + one activity running ``x + 1``,
hosted by the same worker process) vs ours (``Hub.run`` / ``Hub.map``) on both return
paths: the callback receiver (``http``, default) and the workflow result (``native``).

Starts its own dev server (``temporal server start-dev``, in memory, 127.0.0.1) and one
worker process (``tests/integration/temporal/temporal_test_worker.py``: our workflow and
activity next to the native baseline's), measures the paths interleaved in one run, stops
both by PID, and prints one JSON line per return path:

    python benchmarks/bench_temporal.py [--seq 200] [--burst 1000] [--slots 100] [--concurrency 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "integration" / "temporal"))
os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-temporal-"))

from common import alternate, emit, hub_calls, summarize  # noqa: E402
from temporal_services import start_dev_server, start_worker  # noqa: E402

from wove_adapters.core import loop as shared_loop  # noqa: E402
from wove_adapters.integration.hub import Hub  # noqa: E402


def add_one(x: int) -> int:
    return x + 1


class Native:
    """Temporal's own path, on the same shared loop our adapter uses."""

    def __init__(self, address: str, task_queue: str) -> None:
        self.task_queue = task_queue
        self.client: Any = shared_loop.run_sync(self._connect(address))

    @staticmethod
    async def _connect(address: str) -> Any:
        from temporalio.client import Client

        return await Client.connect(address)

    async def one(self, x: int) -> int:
        result: int = await self.client.execute_workflow(
            "user.Increment", x, id=f"bench-native-{uuid.uuid4().hex}",
            task_queue=self.task_queue,
        )
        return result

    def run(self, x: int) -> int:
        return int(shared_loop.run_sync(self.one(x)))

    def burst(self, n: int, concurrency: int) -> list[int]:
        """All at once, with at most ``concurrency`` in flight: the bound ``Hub.map`` gets
        too (the ``workers`` setting), so both sides put the same load on the server."""

        async def _all() -> list[int]:
            gate = asyncio.Semaphore(concurrency)

            async def gated(i: int) -> int:
                async with gate:
                    return await self.one(i)

            return list(await asyncio.gather(*(gated(i) for i in range(n))))

        return shared_loop.run_sync(_all())

    def drain(self, timeout: float = 300.0) -> None:
        """Wait until the server has closed every workflow (bursts must not overlap)."""

        async def running() -> int:
            count = await self.client.count_workflows("ExecutionStatus='Running'")
            return int(count.count)

        deadline = time.monotonic() + timeout
        while shared_loop.run_sync(running()) and time.monotonic() < deadline:
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--slots", type=int, default=100,
                        help="the worker's max_concurrent_activities")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=200,
                        help="runs in flight during a burst, both sides (0: all at once; "
                             "the in-memory dev server on a loaded 2-core host collapsed "
                             "under 1000 concurrent starts)")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-temporal-"))
    server = start_dev_server(work / "server")
    queue = f"wove-bench-temporal-{uuid.uuid4().hex[:8]}"
    worker = start_worker(server.address, queue, work / "worker.log",
                          args=["--max-concurrent", str(options.slots)])
    hubs: dict[str, Hub] = {}
    try:
        native = Native(server.address, queue)
        for path in ("http", "native"):
            hubs[path] = Hub(environments={path: {
                "executor": "temporal",
                "executor_config": {
                    "address": server.address, "task_queue": queue, "return_path": path,
                },
                "workers": options.concurrency or None,  # Hub.map's in-flight bound
            }}, default_environment=path)
        concurrency = options.concurrency or options.burst
        # Interleaved, each path under the same conditions; before each burst (untimed)
        # the previous side's workflows are closed.
        measured = alternate({
            "native": (native.run, lambda n: native.burst(n, concurrency)),
            "http": hub_calls(hubs["http"], add_one),
            "native_path": hub_calls(hubs["native"], add_one),
        }, seq=options.seq, burst=options.burst, rounds=1, warmup=options.warmup,
            before_burst=native.drain)
        base = summarize(*measured["native"], digits=2)
        for path, name in (("http", "http"), ("native", "native_path")):
            ours = summarize(*measured[name], digits=2)
            emit({
                "backend": "temporal",
                "return_path": path,
                "native": base,
                "ours": ours,
                "p50_ratio": round(ours["p50_ms"] / base["p50_ms"], 3),
                "throughput_ratio": round(ours["throughput_per_s"] / base["throughput_per_s"], 3),
                "seq": options.seq,
                "burst": options.burst,
                "worker_slots": options.slots,
                "burst_concurrency": concurrency,
            })
    finally:
        for hub in hubs.values():
            hub.close()
        worker.stop()
        server.stop()


if __name__ == "__main__":
    main()
