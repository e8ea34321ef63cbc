"""Taskiq round trip and throughput: native taskiq vs ``Hub.run`` / ``Hub.map``.

Standalone: writes a broker module, starts a real ``taskiq worker`` (1 worker process,
taskiq-redis ``ListQueueBroker`` on a fresh queue, ``register(broker)`` for our payloads and
a native ``x + 1`` task), then measures, interleaved in one run:

- native: ``await task.kiq(x)`` + ``wait_result(check_interval=0.01)`` (the 10 ms poll
  the 11.6 ms reference used), and 1000 kicks at once gathered the same way;
- ours: ``Hub.run(add, x)`` sequentially, and ``Hub.map(add, range(1000))``.

Prints one JSON line. Needs Redis on 127.0.0.1:6379 (or WOVE_BENCH_REDIS_URL).
Usage: python benchmarks/bench_taskiq.py [--tasks 200] [--burst 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

URL = os.environ.get("WOVE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = f"wove-bench-taskiq-{uuid.uuid4().hex[:8]}"

BROKER_MODULE = textwrap.dedent(
    """
    import os
    from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
    from wove_adapters.adapters.taskiq import register

    broker = ListQueueBroker(
        os.environ["BENCH_URL"], queue_name=os.environ["BENCH_QUEUE"], socket_timeout=None
    ).with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_URL"], result_ex_time=600))
    register(broker, processes=int(os.environ.get("BENCH_PROCESSES", "2")))


    @broker.task(task_name="bench.add")
    async def add(x: int) -> int:
        return x + 1
    """
)


def add(x: int) -> int:
    return x + 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_worker(workdir: Path, processes: int) -> subprocess.Popen[bytes]:
    (workdir / "bench_broker.py").write_text(BROKER_MODULE)
    env = {
        **os.environ,
        "BENCH_URL": URL,
        "BENCH_QUEUE": QUEUE,
        "BENCH_PROCESSES": str(processes),
        "PYTHONPATH": os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", "bench_broker:broker", "--workers", "1",
         "--log-level", "WARNING"],
        env=env, cwd=str(workdir), start_new_session=True,
        stdout=open(workdir / "worker.log", "wb"), stderr=subprocess.STDOUT,
    )
    import redis

    client = redis.Redis.from_url(URL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if client.zcard(f"wove:taskiq:workers:{QUEUE}"):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise SystemExit(f"taskiq worker did not start: {(workdir / 'worker.log').read_text()[-2000:]}")


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

    def sequential(self, n: int) -> list[float]:
        times = []
        for i in range(n):
            start = time.perf_counter()
            assert self.loop.run_until_complete(self._one(i)) == i + 1
            times.append(time.perf_counter() - start)
        return times

    def burst(self, n: int) -> float:
        async def go() -> list[int]:
            tasks = [await self.kicker().kiq(i) for i in range(n)]
            results = await asyncio.gather(
                *(t.wait_result(check_interval=0.01, timeout=300) for t in tasks)
            )
            return [int(r.return_value) for r in results]

        start = time.perf_counter()
        values = self.loop.run_until_complete(go())
        elapsed = time.perf_counter() - start
        assert values == [i + 1 for i in range(n)]
        return n / elapsed

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

    def sequential(self, n: int) -> list[float]:
        times = []
        for i in range(n):
            start = time.perf_counter()
            assert self.hub.run(add, i) == i + 1
            times.append(time.perf_counter() - start)
        return times

    def burst(self, n: int) -> float:
        start = time.perf_counter()
        values = self.hub.map(add, range(n))
        elapsed = time.perf_counter() - start
        assert values == [i + 1 for i in range(n)]
        return n / elapsed

    def close(self) -> None:
        self.hub.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, help="payload processes")
    options = parser.parse_args()

    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-"))
    workdir = Path(tempfile.mkdtemp(prefix="wove-bench-taskiq-"))
    worker = start_worker(workdir, options.processes)
    native = ours = None
    try:
        native, ours = Native(), Ours()
        native.sequential(20)
        ours.sequential(20)
        lat: dict[str, list[float]] = {"native": [], "ours": []}
        thr: dict[str, list[float]] = {"native": [], "ours": []}
        chunk = max(options.tasks // 4, 1)
        while len(lat["ours"]) < options.tasks:  # interleaved in chunks
            lat["native"] += native.sequential(chunk)
            lat["ours"] += ours.sequential(chunk)
        for _ in range(options.rounds):
            thr["native"].append(native.burst(options.burst))
            thr["ours"].append(ours.burst(options.burst))
        report: dict[str, Any] = {"backend": "taskiq"}
        for side in ("native", "ours"):
            report[side] = {
                "p50_ms": round(statistics.median(lat[side]) * 1000, 2),
                "p99_ms": round(percentile(lat[side], 0.99) * 1000, 2),
                "throughput_per_s": round(statistics.median(thr[side]), 1),
            }
        report["ratios"] = {
            "p50": round(report["ours"]["p50_ms"] / report["native"]["p50_ms"], 3),
            "throughput": round(
                report["ours"]["throughput_per_s"] / report["native"]["throughput_per_s"], 3
            ),
        }
        print(json.dumps(report))
    finally:
        for side in (native, ours):
            if side is not None:
                side.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        import redis

        client = redis.Redis.from_url(URL)
        client.delete(QUEUE, f"wove:taskiq:workers:{QUEUE}")
        for key in client.scan_iter(match=f"wove:taskiq:{QUEUE}:*", count=1000):
            client.delete(key)


if __name__ == "__main__":
    main()
