"""Celery: our round trip and throughput against Celery's own submit + result path.

Standalone: starts a real ``celery worker --pool=prefork`` per broker (like the tests,
private queue and key prefix, stopped by PID), then measures, interleaved in one run:

- sequential round trip of ``x + 1`` (p50/p99 over ``--n`` tasks): native is
  ``app.send_task(...).get()`` (Redis result backend, pub/sub wake-up); ours is
  ``Hub.run(add, x)`` (payload signed, events back over HTTP);
- throughput for ``--burst`` tasks submitted at once: native sends them all and then
  ``.get()``s each; ours is ``Hub.map``.

Ours runs twice, interleaved with native: with the default ``http`` return path and
with the ``redis`` drop box. Then CPU per task, native and ours taking turns over
``--cpu-rounds`` bursts each: the worker's (the ``celery worker`` process and its prefork
children, from ``/proc/<pid>/stat``: what a deployment pays per task) and the caller's
(this process, ``getrusage``). Prints one JSON line per broker:
``{"backend": "celery+redis", "native": {...}, "ours": {...},
"ours_redis_return_path": {...}, "ratio": {...}, "ratio_redis_return_path": {...},
"cpu_us_per_task": {"native": {"worker": ..., "caller": ...}, "ours": {...}}}``.

    python benchmarks/bench_celery.py [--broker redis|amqp|both] [--n 300] [--burst 1000]
                                      [--cpu-rounds 2]
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "celery"))

from celery_services import REDIS_URL, CeleryService  # noqa: E402
from common import alternate, emit, hub_calls, ratio_block, speed_arguments, summarize  # noqa: E402

from wove_adapters.integration.hub import Hub  # noqa: E402
from wove_adapters.testing.tasks import add  # noqa: E402


def native_calls(app: Any, queue: str) -> tuple[
        Callable[[int], int], Callable[[int], list[int]]]:
    """Celery's own path as a side: ``send_task("wove_test.add", [x, 1]).get()`` one at a
    time, and a burst sent all at once, then every ``.get()``."""

    def one(x: int) -> int:
        return int(app.send_task("wove_test.add", args=[x, 1], queue=queue).get(timeout=60))

    def burst(count: int) -> list[int]:
        results = [app.send_task("wove_test.add", args=[i, 1], queue=queue)
                   for i in range(count)]
        return [int(r.get(timeout=300)) for r in results]

    return one, burst


_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of one process, all its threads (``/proc/PID/stat``)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def worker_cpu(pid: int) -> float:
    """CPU seconds of a ``celery worker`` and its live pool children (prefork children
    live for the whole benchmark: Celery's default ``max_tasks_per_child`` is unset)."""
    total = process_cpu(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += process_cpu(int(child))
    return total


def caller_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_per_task(sides: dict[str, Callable[[int], Any]], worker_pid: int, burst: int,
                 rounds: int) -> dict[str, dict[str, float]]:
    """Microseconds of worker and caller CPU per task for each side's burst, the sides
    taking turns burst by burst (median over ``rounds``). A pause after each burst lets
    the worker finish what it does after the result is out (state writes, acks)."""
    samples: dict[str, dict[str, list[float]]] = {
        name: {"worker": [], "caller": []} for name in sides}
    for _ in range(rounds):
        for name, many in sides.items():
            time.sleep(0.5)
            worker0, caller0 = worker_cpu(worker_pid), caller_cpu()
            many(burst)
            caller1 = caller_cpu()
            time.sleep(0.5)
            worker1 = worker_cpu(worker_pid)
            samples[name]["worker"].append((worker1 - worker0) / burst * 1e6)
            samples[name]["caller"].append((caller1 - caller0) / burst * 1e6)
    return {name: {who: round(sorted(values)[len(values) // 2], 1)
                   for who, values in found.items()}
            for name, found in samples.items()}


def bench(broker: str, n: int, burst: int, rounds: int, concurrency: int,
          cpu_rounds: int = 2) -> dict[str, Any]:
    service = CeleryService(broker, concurrency=concurrency, log_dir=Path(tempfile.mkdtemp()))
    service.start()
    app = service.client_app()
    dropbox = {**service.executor_config, "return_path": "redis",
               "return_redis_url": REDIS_URL}
    hub = Hub(environments={
        "bench": {"executor": "celery", "executor_config": service.executor_config},
        "bench_redis": {"executor": "celery", "executor_config": dropbox},
    }, default_environment="bench")
    try:
        # Warm both paths (connections, receiver, worker children, imports) first.
        measured = alternate({
            "native": native_calls(app, service.queue),
            "ours": hub_calls(hub, add),
            "chunked": hub_calls(hub, add, chunked=True),
            "dropbox": (lambda x: hub.run(add, x, environment="bench_redis"),
                        lambda n: hub.map(add, range(n), environment="bench_redis")),
        }, seq=n, burst=burst, rounds=rounds, warmup=30)
        assert service.process is not None
        cpu = cpu_per_task({"native": native_calls(app, service.queue)[1],
                            "ours": hub_calls(hub, add)[1]},
                           service.process.pid, burst, cpu_rounds) if cpu_rounds else {}
    finally:
        hub.close()
        app.close()
        service.stop()
        service.cleanup()
    native, ours, dropbox, chunked = (
        summarize(*measured[name]) for name in ("native", "ours", "dropbox", "chunked")
    )
    return {
        "backend": f"celery+{'redis' if broker == 'redis' else 'rabbitmq'}",
        "tasks": n, "burst": burst, "worker_concurrency": concurrency,
        "native": native,
        "ours": ours,
        "ours_redis_return_path": dropbox,
        "ratio": ratio_block(ours, native),
        "ratio_redis_return_path": ratio_block(dropbox, native),
        "ours_chunked": chunked,
        "ratio_chunked": ratio_block(chunked, native),
        "cpu_us_per_task": cpu,
    }


def main() -> None:
    parser = speed_arguments(__doc__.split("\n")[0], seq=300, seq_flag="--n")
    parser.add_argument("--broker", choices=["redis", "amqp", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    parser.add_argument("--cpu-rounds", type=int, default=2,
                        help="bursts per side for CPU per task (0: skip)")
    options = parser.parse_args()
    brokers = ["redis", "amqp"] if options.broker == "both" else [options.broker]
    for broker in brokers:
        emit(bench(broker, options.n, options.burst, options.rounds, options.concurrency,
                   options.cpu_rounds))


if __name__ == "__main__":
    main()
