"""Taskiq round trip and throughput: native taskiq vs ``Hub.run`` / ``Hub.map``.

Standalone: writes a broker module, starts a real ``taskiq worker`` (1 worker process,
taskiq-redis ``ListQueueBroker`` on a fresh queue, ``register(broker)`` for our payloads and
a native ``x + 1`` task), then measures, interleaved in one run:

- native: ``await task.kiq(x)`` + ``wait_result(check_interval=0.01)`` (the 10 ms poll
  the 11.6 ms reference used), and 1000 kicks at once gathered the same way;
- ours: ``Hub.run(add, x)`` sequentially, and ``Hub.map(add, range(1000))`` (each run its
  own message);
- ours chunked (bursts only): ``Hub.map`` with ``map_chunk_size="auto"`` (K runs per
  message), reported as ``ours_chunked``; each side's bursts report CPU per task too.

Prints one JSON line. Needs Redis on 127.0.0.1:6379 (or WOVE_BENCH_REDIS_URL).
Usage: python benchmarks/bench_taskiq.py [--tasks 200] [--burst 1000] [--rounds 2]
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import common  # noqa: E402
from services import ServiceProcess  # noqa: E402

URL = os.environ.get("WOVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = f"wove-bench-taskiq-{uuid.uuid4().hex[:8]}"

def add(x: int) -> int:
    return x + 1


def start_worker(workdir: Path, processes: int,
                 module: str = "taskiq_bench_broker") -> ServiceProcess:
    """A ``taskiq worker`` on the broker of ``module`` (``taskiq_bench_broker.py``, or
    bench_wove_taskiq's ``wove_workers/wove_taskiq_broker.py``) (ServiceProcess: own
    group, log, stop by PID), ready once our register() hook has announced it in Redis."""
    import redis

    env = {
        **os.environ,
        "BENCH_URL": URL,
        "BENCH_QUEUE": QUEUE,
        "BENCH_PROCESSES": str(processes),
        "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(HERE / "wove_workers"), os.environ.get("PYTHONPATH", "")]),
    }
    client = redis.Redis.from_url(URL)
    try:
        return ServiceProcess(
            f"taskiq worker on {QUEUE}",
            [sys.executable, "-m", "taskiq", "worker", f"{module}:broker", "--workers", "1",
             "--log-level", "WARNING"],
            log=workdir / "worker.log", env=env, cwd=workdir, grace=20, ready_timeout=90,
            ready=lambda: client.zcard(f"wove:taskiq:workers:{QUEUE}"),
        ).start()
    finally:
        client.close()


def stop_worker(worker: ServiceProcess) -> None:
    """Stop the worker by PID, then remove the queue and our keys for it."""
    import redis

    worker.stop()
    client = redis.Redis.from_url(URL)
    client.delete(QUEUE, f"wove:taskiq:workers:{QUEUE}")
    for key in client.scan_iter(match=f"wove:taskiq:{QUEUE}:*", count=1000):
        client.delete(key)
    client.close()


class Native:
    """The backend's own submit + result path, on a private event loop."""

    def __init__(self) -> None:
        from taskiq.kicker import AsyncKicker
        from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

        self.loop = asyncio.new_event_loop()
        self.broker = ListQueueBroker(URL, queue_name=QUEUE).with_result_backend(
            RedisAsyncResultBackend(URL, result_ex_time=600)
        )
        self.kicker = lambda: AsyncKicker("bench.add", self.broker, {})
        self.loop.run_until_complete(self.broker.startup())

    async def _one(self, x: int) -> int:
        task = await self.kicker().kiq(x)
        result = await task.wait_result(check_interval=0.01, timeout=60)
        return int(result.return_value)

    def one(self, x: int) -> int:
        return self.loop.run_until_complete(self._one(x))

    def many(self, n: int) -> list[int]:
        async def go() -> list[int]:
            tasks = [await self.kicker().kiq(i) for i in range(n)]
            results = await asyncio.gather(
                *(t.wait_result(check_interval=0.01, timeout=300) for t in tasks)
            )
            return [int(r.return_value) for r in results]

        return self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.broker.shutdown())
        self.loop.close()


class Ours:
    def __init__(self) -> None:
        from wove_adapters.integration.hub import Hub

        config = {"url": URL, "queue": QUEUE}
        self.hub = Hub(
            environments={"tq": {"executor": "taskiq", "executor_config": config}},
            default_environment="tq",
        )
        assert self.hub.run(add, 1) == 2  # warm: receiver, broker, payload processes

    def one(self, x: int) -> int:
        return int(self.hub.run(add, x))

    def many(self, n: int) -> list[int]:
        """Each run its own taskiq message (``map_chunk_size=0``), as native sends them."""
        return list(self.hub.map(add, range(n), map_chunk_size=0))

    def many_chunked(self, n: int) -> list[int]:
        """K runs per taskiq message (``map_chunk_size="auto"``)."""
        return list(self.hub.map(add, range(n), map_chunk_size="auto"))

    def close(self) -> None:
        self.hub.close()


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0], rounds=2, seq_flag="--tasks")
    parser.add_argument("--processes", type=int, default=2, help="payload processes")
    options = parser.parse_args()

    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-"))
    workdir = Path(tempfile.mkdtemp(prefix="wove-bench-taskiq-"))
    worker = start_worker(workdir, options.processes)
    native = ours = None
    try:
        native, ours = Native(), Ours()
        sides = {"native": native, "ours": ours}
        lat: dict[str, list[float]] = {"native": [], "ours": []}
        thr: dict[str, list[float]] = {"native": [], "ours": []}
        for side in sides.values():
            common.round_trips(side.one, 20)
        chunk = max(options.tasks // 4, 1)
        while len(lat["ours"]) < options.tasks:  # interleaved in chunks
            for name, side in sides.items():
                lat[name] += common.round_trips(side.one, chunk)
        # Bursts: native, ours (each run alone) and ours chunked take turns round by round.
        cpu = common.CpuMeter(options.burst, lambda: [worker.pid])
        bursts = {"native": native.many, "ours": ours.many, "chunked": ours.many_chunked}
        thr["chunked"] = []
        common.burst_rate(ours.many_chunked, 50)  # warm: the chunk size learns the task's time
        for _ in range(options.rounds):
            for name, many in bursts.items():
                thr[name].append(common.burst_rate(cpu.wrap(name, many), options.burst))
        report: dict[str, Any] = {"backend": "taskiq"}
        for name in sides:
            report[name] = {**common.summarize(lat[name], thr[name], digits=2), **cpu.figures(name)}
        report.update(common.chunked_figures(thr["chunked"], cpu, report["native"]))
        report["ratios"] = {
            "p50": common.ratio(report["ours"]["p50_ms"], report["native"]["p50_ms"]),
            "throughput": common.ratio(report["ours"]["throughput_per_s"],
                                report["native"]["throughput_per_s"]),
        }
        common.emit(report)
    finally:
        for closing in (native, ours):
            if closing is not None:
                closing.close()
        stop_worker(worker)


if __name__ == "__main__":
    main()
