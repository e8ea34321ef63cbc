"""ARQ: native vs ours vs wove 2.0.3's arq adapter, interleaved in one run.

One ``arq`` CLI worker (``wove_workers/wove_arq_settings.WoveBenchSettings``: the tests'
bench settings, 10 ms ``poll_delay``, ``max_jobs`` 100, plus wove's worker function) in
Redis database 10, stopped by PID, serves all three sides:

- native: ``await (await pool.enqueue_job("native_add", x)).result(poll_delay=0.01)``;
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``arq`` executor (``enqueue_job("wove_run_backend_payload", payload,
  _job_id=<run id>)``, result POSTed to its callback server), driven warm.

    python benchmarks/bench_wove_arq.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ARQ_TESTS = HERE.parent / "tests" / "integration" / "arq"
WORKERS = HERE / "wove_workers"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ARQ_TESTS))

from arq_services import (  # noqa: E402
    REDIS_URL,
    SESSION,
    ArqWorker,
    arq_command,
    cleanup_session,
    environment,
    redis_client,
)
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


def start_worker(max_jobs: int, log_dir: Path) -> ArqWorker:
    """The tests' ArqWorker, launched with this benchmark's settings module."""
    worker = ArqWorker(f"{SESSION}-wove-bench", log_dir,
                       env={"WOVE_TEST_ARQ_MAX_JOBS": str(max_jobs),
                            "PYTHONPATH": os.pathsep.join([str(WORKERS), str(ARQ_TESTS)])})
    client = redis_client()
    client.delete(worker.health_key)
    worker.starts = 1
    with open(log_dir / f"{worker.queue}-1.log", "wb") as out:
        worker.proc = subprocess.Popen(
            [*arq_command(), "wove_arq_settings.WoveBenchSettings"], cwd=str(WORKERS),
            env=worker.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not client.exists(worker.health_key):
            if worker.proc.poll() is not None or time.monotonic() > deadline:
                worker.kill()
                raise RuntimeError(f"the arq worker did not start: {worker.log_tail()}")
            time.sleep(0.05)
    finally:
        client.close()
    return worker


def main() -> None:
    parser = bench_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--max-jobs", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-arq-"))
    from arq import create_pool
    from arq.connections import RedisSettings

    from wove_adapters.integration.hub import Hub

    worker = start_worker(args.max_jobs, Path(tempfile.mkdtemp(prefix="bench-wove-arq-")))
    loop = asyncio.new_event_loop()
    pool = loop.run_until_complete(
        create_pool(RedisSettings.from_dsn(REDIS_URL), default_queue_name=worker.queue))
    hub = Hub(environments={"bench": environment(queue_name=worker.queue)},
              default_environment="bench")
    counter = iter(range(10**9))
    wove_config = {"redis_settings": RedisSettings.from_dsn(REDIS_URL),
                   "queue_name": worker.queue}
    wove: WoveRuntime | None = None
    wove_note: str | None = None
    weave: dict[str, Any] | None = None

    async def native_one(x: int) -> int:
        job = await pool.enqueue_job("native_add", x, _job_id=f"{SESSION}-n{next(counter)}")
        assert job is not None
        return int(await job.result(timeout=60, poll_delay=0.01))

    async def native_burst(n: int) -> list[int]:
        return list(await asyncio.gather(*(native_one(i) for i in range(n))))

    try:
        sides = [Side("native", lambda x: loop.run_until_complete(native_one(x)),
                      lambda n: loop.run_until_complete(native_burst(n))),
                 hub_side(hub)]
        try:
            wove = WoveRuntime("arq", wove_config)
            sides.append(wove.side())
        except Exception as exc:
            wove_note = f"wove's arq executor did not start: {type(exc).__name__}: {exc}"
        measured = interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=args.warmup, label="arq")
        if wove is not None and args.weave_samples:
            wove.close()
            wove = None
            log("timing one-task wove weaves")
            try:
                weave = weave_round_trip({"executor": "arq", "executor_config": wove_config},
                                         args.weave_samples)
            except Exception as exc:
                weave = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        hub.close()
        if wove is not None:
            wove.close()
        loop.run_until_complete(pool.aclose())
        loop.close()
        worker.stop()
        cleanup_session()
    emit(record_of("arq", measured, wove_note=wove_note, wove_weave_per_task=weave,
                   settings={"seq": args.seq, "burst": args.burst, "rounds": args.rounds,
                             "max_jobs": args.max_jobs, "poll_delay_s": 0.01}))


if __name__ == "__main__":
    main()
