"""ARQ: our round trip and throughput against ARQ's own enqueue + result path.

Standalone: starts a real ``arq`` CLI worker (like the tests: private queue and job-id
prefix in Redis database 10, 10 ms ``poll_delay``, stopped by PID) serving both paths,
then measures, interleaved in one run:

- sequential round trip of ``x + 1`` (p50/p99 over ``--n`` tasks): native is
  ``await (await pool.enqueue_job("native_add", x)).result(poll_delay=0.01)`` (an async
  job function, the result polled from Redis every 10 ms); ours is ``Hub.run(add, x)``
  (payload signed, run in a worker thread, events back over HTTP);
- throughput for ``--burst`` tasks submitted at once: native enqueues them all
  concurrently and then awaits every result; ours is ``Hub.map``.

Prints one JSON line:
``{"backend": "arq", "native": {...}, "ours": {...}, "ratio": {...}}``.

    python benchmarks/bench_arq.py [--n 300] [--burst 1000] [--rounds 3] [--max-jobs 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "arq"))

from arq_services import (  # noqa: E402
    REDIS_URL,
    SESSION,
    ArqWorker,
    cleanup_session,
    environment,
    require_redis,
)

from wove_adapters.integration.hub import Hub  # noqa: E402
from wove_adapters.testing.tasks import add  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(latencies: list[float], throughputs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "throughput_per_s": round(statistics.median(throughputs), 1),
    }


def bench(n: int, burst: int, rounds: int, max_jobs: int) -> dict[str, Any]:
    from arq import create_pool
    from arq.connections import RedisSettings

    require_redis()
    worker = ArqWorker(f"{SESSION}-bench", Path(tempfile.mkdtemp()),
                       settings="BenchWorkerSettings",
                       env={"WOVE_TEST_ARQ_MAX_JOBS": str(max_jobs)}).start()
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(
        create_pool(RedisSettings.from_dsn(REDIS_URL), default_queue_name=worker.queue)
    )
    hub = Hub(environments={"bench": environment(queue_name=worker.queue)},
              default_environment="bench")
    counter = iter(range(10**9))

    async def native_one(x: int) -> int:
        job = await pool.enqueue_job("native_add", x, _job_id=f"{SESSION}-n{next(counter)}")
        assert job is not None
        return int(await job.result(timeout=60, poll_delay=0.01))

    async def native_burst(count: int) -> list[int]:
        return list(await asyncio.gather(*(native_one(i) for i in range(count))))

    try:
        for i in range(30):  # warm both paths (connections, receiver, imports, threads)
            assert loop.run_until_complete(native_one(i)) == i + 1
            assert hub.run(add, i) == i + 1
        native_lat: list[float] = []
        ours_lat: list[float] = []
        for i in range(n):
            start = time.perf_counter()
            assert loop.run_until_complete(native_one(i)) == i + 1
            native_lat.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert hub.run(add, i) == i + 1
            ours_lat.append(time.perf_counter() - start)
        native_tp: list[float] = []
        ours_tp: list[float] = []
        expected = [i + 1 for i in range(burst)]
        for _ in range(rounds):
            start = time.perf_counter()
            assert loop.run_until_complete(native_burst(burst)) == expected
            native_tp.append(burst / (time.perf_counter() - start))
            start = time.perf_counter()
            assert hub.map(add, range(burst)) == expected
            ours_tp.append(burst / (time.perf_counter() - start))
    finally:
        hub.close()
        loop.run_until_complete(pool.aclose())
        loop.close()
        worker.stop()
        cleanup_session()
    native = summary(native_lat, native_tp)
    ours = summary(ours_lat, ours_tp)
    return {
        "backend": "arq",
        "native": native,
        "ours": ours,
        "ratio": {
            "p50": round(ours["p50_ms"] / native["p50_ms"], 3),
            "p99": round(ours["p99_ms"] / native["p99_ms"], 3),
            "throughput": round(ours["throughput_per_s"] / native["throughput_per_s"], 3),
        },
        "settings": {"n": n, "burst": burst, "rounds": rounds, "max_jobs": max_jobs,
                     "poll_delay_s": 0.01},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-jobs", type=int, default=100)
    options = parser.parse_args()
    print(json.dumps(bench(options.n, options.burst, options.rounds, options.max_jobs)))


if __name__ == "__main__":
    main()
