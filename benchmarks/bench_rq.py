"""RQ: native ``Queue.enqueue`` + ``job.latest_result(timeout=...)`` vs ours (``Hub.run`` /
``Hub.map``), through the same real ``rq worker`` (RQ's forking worker: one work-horse
per job; ours is started with ``-w wove_adapters.adapters.rq.Worker``, which only adds a
preload of the payload runner before the first fork).

Starts its own worker on a fresh queue in Redis db ``$WOVE_BENCH_RQ_DB`` (default 9),
interleaves native and ours sample by sample (sequential round trips) and round by round
(bursts of tasks submitted at once), stops the worker by PID, removes its jobs, and prints
one JSON line. A third side, ``Hub.map`` with chunking (``map_chunk_size="auto"``: K runs
per RQ job), bursts in the same rounds (``ours_chunked``); each side's bursts also report
caller and worker CPU per task:

    python benchmarks/bench_rq.py [--seq 200] [--burst 1000] [--rounds 1] [--workers 1]
                                  [--worker-class wove_adapters.adapters.rq.Worker]
"""

from __future__ import annotations

import argparse
import operator
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "support"))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "rq"))

import common  # noqa: E402
from rq_services import cleanup_queue  # noqa: E402
from services import ServiceProcess  # noqa: E402

REDIS_URL = os.environ.get(
    "WOVE_BENCH_RQ_REDIS_URL", f"redis://127.0.0.1:6379/{os.environ.get('WOVE_BENCH_RQ_DB', '9')}"
)


def add_one(x: int) -> int:
    return x + 1


def start_workers(
    queue: str, count: int, log_dir: Path, worker_class: str = "wove_adapters.adapters.rq.Worker"
) -> list[ServiceProcess]:
    """``count`` ``rq worker`` processes (ServiceProcess: own group, log, stop by PID), each
    ready once RQ lists it among the queue's workers."""
    from redis import Redis
    from rq import Queue, Worker

    connection = Redis.from_url(REDIS_URL)
    registered = Queue(queue, connection=connection)
    workers: list[ServiceProcess] = []
    try:
        for i in range(count):
            workers.append(ServiceProcess(
                f"rq worker {i} on {queue}",
                [sys.executable, "-m", "rq.cli", "worker", queue, "--url", REDIS_URL,
                 "--logging_level", "WARNING", "-w", worker_class],
                log=log_dir / f"worker-{i}.log", cwd=log_dir,
                ready=lambda n=i + 1: len(Worker.all(queue=registered)) >= n,
            ).start())
    except BaseException:
        stop_workers(workers)
        raise
    finally:
        connection.close()
    return workers


def stop_workers(workers: list[ServiceProcess]) -> None:
    for worker in workers:
        worker.stop()


def cleanup(queue: str) -> None:
    """The tests' clean-up of a queue (its jobs, registries and keys), in our database."""
    cleanup_queue(queue, url=REDIS_URL)


class Native:
    """RQ's own path: enqueue ``operator.add(x, 1)``; block on the result stream."""

    def __init__(self, queue: str) -> None:
        from redis import Redis
        from rq import Queue

        self.connection = Redis.from_url(REDIS_URL)
        self.queue = Queue(queue, connection=self.connection)

    def one(self, x: int) -> int:
        job = self.queue.enqueue(operator.add, x, 1)
        return int(self._value(job))

    def burst(self, n: int) -> list[int]:
        from rq import Queue

        jobs = self.queue.enqueue_many(
            [Queue.prepare_data(operator.add, (i, 1)) for i in range(n)]
        )
        return [int(self._value(job)) for job in jobs]

    @staticmethod
    def _value(job: Any) -> Any:
        result = job.latest_result(timeout=120)
        if result is None or result.type != result.Type.SUCCESSFUL:
            raise RuntimeError(f"native job {job.id} did not succeed: {result}")
        return result.return_value


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from wove_adapters.integration.hub import Hub

    queue = f"wove-bench-rq-{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix="bench-rq-"))
    procs = start_workers(queue, args.workers, log_dir, args.worker_class)
    hub = Hub(environments={"rq": {"executor": "rq", "executor_config": {
        "redis_url": REDIS_URL, "queue": queue}}}, default_environment="rq")
    native = Native(queue)
    cpu = common.CpuMeter(args.burst, lambda: [proc.pid for proc in procs])
    try:  # 5 untimed round trips each first: connections, receiver, first fork
        measured = common.alternate(
            common.metered_sides(cpu, {"ours": hub}, add_one, native=(native.one, native.burst)),
            seq=args.seq, burst=args.burst, rounds=args.rounds, warmup=5)
    finally:
        hub.close()
        native.connection.close()
        stop_workers(procs)
        cleanup(queue)

    native_stats, ours_stats = (common.side_figures(measured, cpu, name, digits=2)
                                for name in ("native", "ours"))
    result: dict[str, Any] = {"backend": "rq", "native": native_stats, "ours": ours_stats}
    result.update(common.chunked_figures(measured["chunked"][1], cpu, native_stats))
    result["ratios"] = {
        "p50_ours_over_native": common.ratio(ours_stats["p50_ms"], native_stats["p50_ms"]),
        "throughput_ours_over_native": common.ratio(ours_stats["throughput_per_s"],
                                             native_stats["throughput_per_s"]),
    }
    result["setup"] = common.settings_of(args, workers=args.workers, worker_class=args.worker_class)
    return result


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0], rounds=1)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--worker-class", default="wove_adapters.adapters.rq.Worker",
                        help="the rq worker class both paths run on")
    args = parser.parse_args()
    # The caller and the worker share one home, so the worker finds the signing key.
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="bench-rq-home-"))
    common.emit(measure(args))


if __name__ == "__main__":
    main()
