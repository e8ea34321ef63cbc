"""Celery: our round trip and throughput against Celery's own submit + result path.

Standalone: starts a real ``celery worker --pool=prefork`` per broker (like the tests,
private queue and key prefix, stopped by PID), then measures, interleaved in one run:

- sequential round trip of ``x + 1`` (p50/p99 over ``--n`` tasks): native is
  ``app.send_task(...).get()`` (Redis result backend, pub/sub wake-up); ours is
  ``Hub.run(add, x)`` (payload signed, events back over HTTP);
- throughput for ``--burst`` tasks submitted at once: native sends them all and then
  ``.get()``s each; ours is ``Hub.map``.

Ours runs three ways, interleaved with native: each run alone with the default ``http``
return path, each alone with the ``redis`` drop box, and chunked (``map_chunk_size="auto"``,
bursts only). Every side's bursts also count CPU per task (``common.CpuMeter``): the
caller's (this process) and the workers' (the ``celery worker`` process and its prefork
children: what a deployment pays per task). Prints one JSON line per broker:
``{"backend": "celery+redis", "native": {...}, "ours": {...},
"ours_redis_return_path": {...}, "ours_chunked": {...}, "ratio": {...},
"ratio_redis_return_path": {...}, "ratio_chunked": {...}}``.

    python benchmarks/bench_celery.py [--broker redis|amqp|both] [--n 300] [--burst 1000]
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "celery"))

import common  # noqa: E402
from celery_services import REDIS_URL, CeleryService  # noqa: E402

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


def bench(broker: str, n: int, burst: int, rounds: int, concurrency: int) -> dict[str, Any]:
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
        assert service.process is not None
        pid = service.process.pid
        cpu = common.CpuMeter(burst, lambda: [pid])  # the celery worker and its prefork children
        # Warm every path (connections, receiver, worker children, imports) first.
        sides = common.metered_sides(cpu, {"ours": hub}, add,
                              native=native_calls(app, service.queue))
        sides["dropbox"] = cpu.side("dropbox",
                                    common.hub_calls(hub, add, environment="bench_redis"))
        measured = common.alternate(sides, seq=n, burst=burst, rounds=rounds, warmup=30)
    finally:
        hub.close()
        app.close()
        service.stop()
        service.cleanup()
    native, ours, dropbox = (common.side_figures(measured, cpu, name)
                             for name in ("native", "ours", "dropbox"))
    return {
        "backend": f"celery+{'redis' if broker == 'redis' else 'rabbitmq'}",
        "tasks": n, "burst": burst, "worker_concurrency": concurrency,
        "native": native,
        "ours": ours,
        "ours_redis_return_path": dropbox,
        "ratio": common.ratio_block(ours, native),
        "ratio_redis_return_path": common.ratio_block(dropbox, native),
        **common.chunked_figures(measured["chunked"][1], cpu, native),
    }


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n")[0], seq=300, seq_flag="--n")
    parser.add_argument("--broker", choices=["redis", "amqp", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=2, help="worker processes")
    options = parser.parse_args()
    brokers = ["redis", "amqp"] if options.broker == "both" else [options.broker]
    for broker in brokers:
        common.emit(bench(broker, options.n, options.burst, options.rounds, options.concurrency))


if __name__ == "__main__":
    main()
