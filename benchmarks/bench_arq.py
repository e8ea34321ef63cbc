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

A third side, ``Hub.map`` with chunking (``map_chunk_size="auto"``: K runs per ARQ job),
bursts in the same rounds (``ours_chunked``); each side's bursts also report caller and
worker CPU per task. Prints one JSON line:
``{"backend": "arq", "native": {...}, "ours": {...}, "ratio": {...}}``.

    python benchmarks/bench_arq.py [--n 300] [--burst 1000] [--rounds 3] [--max-jobs 100]
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "arq"))

import common  # noqa: E402
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


def native_calls(pool: Any, loop: asyncio.AbstractEventLoop) -> tuple[
        Callable[[int], int], Callable[[int], list[int]]]:
    """ARQ's own path on ``loop``: enqueue ``native_add`` with a unique job id, poll the
    result every 10 ms; a burst enqueues every job concurrently (bench_wove_arq too)."""
    counter = iter(range(10**9))

    async def one(x: int) -> int:
        job = await pool.enqueue_job("native_add", x, _job_id=f"{SESSION}-n{next(counter)}")
        assert job is not None
        return int(await job.result(timeout=60, poll_delay=0.01))

    async def burst(count: int) -> list[int]:
        return list(await asyncio.gather(*(one(i) for i in range(count))))

    return (lambda x: loop.run_until_complete(one(x)),
            lambda count: loop.run_until_complete(burst(count)))


@contextlib.contextmanager
def native_and_ours(worker: ArqWorker) -> Iterator[
        tuple[tuple[Callable[[int], int], Callable[[int], list[int]]], Hub]]:
    """ARQ's own path (``native_calls`` on a pool and loop of its own) and our Hub, both on
    ``worker``'s queue; afterwards both are closed, the worker is stopped by PID and the
    session's keys are removed (bench_wove_arq too)."""
    from arq import create_pool
    from arq.connections import RedisSettings

    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(
        create_pool(RedisSettings.from_dsn(REDIS_URL), default_queue_name=worker.queue)
    )
    hub = Hub(environments={"bench": environment(queue_name=worker.queue)},
              default_environment="bench")
    try:
        yield native_calls(pool, loop), hub
    finally:
        hub.close()
        loop.run_until_complete(pool.aclose())
        loop.close()
        worker.stop()
        cleanup_session()


def bench(n: int, burst: int, rounds: int, max_jobs: int) -> dict[str, Any]:
    require_redis()
    worker = ArqWorker(f"{SESSION}-bench", Path(tempfile.mkdtemp()),
                       settings="BenchWorkerSettings",
                       env={"WOVE_TEST_ARQ_MAX_JOBS": str(max_jobs)}).start()
    cpu = common.CpuMeter(burst, lambda: [worker.pid])
    with native_and_ours(worker) as (calls, hub):
        # 30 untimed round trips each first: connections, receiver, imports, threads.
        measured = common.alternate(common.metered_sides(cpu, {"ours": hub}, add, native=calls),
                             seq=n, burst=burst, rounds=rounds, warmup=30)
    native, ours = (common.side_figures(measured, cpu, name) for name in ("native", "ours"))
    return {
        "backend": "arq",
        "native": native,
        "ours": ours,
        "ratio": common.ratio_block(ours, native),
        **common.chunked_figures(measured["chunked"][1], cpu, native),
        "settings": {"n": n, "burst": burst, "rounds": rounds, "max_jobs": max_jobs,
                     "poll_delay_s": 0.01},
    }


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0], seq=300, seq_flag="--n")
    parser.add_argument("--max-jobs", type=int, default=100)
    options = parser.parse_args()
    common.emit(bench(options.n, options.burst, options.rounds, options.max_jobs))


if __name__ == "__main__":
    main()
