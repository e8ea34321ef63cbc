"""Celery: native vs ours vs wove 2.0.3's Celery adapter, interleaved in one run.

One ``celery worker --pool=prefork -c 2`` per broker (the tests' ``CeleryService``:
private queue and key prefix, stopped by PID) runs the app in
``wove_workers/wove_celery_app.py``, which serves all three sides:

- native: ``app.send_task("wove_test.add", [x, 1]).get()`` (Redis result backend);
- ours: ``Hub.run(add, x)`` / ``Hub.map`` (default ``http`` return path);
- wove: wove's ``celery`` executor (its ``send_task("wove.run_backend_payload",
  [payload])``, the result POSTed to its callback server), driven warm
  (``common.WoveRuntime``).

Prints one JSON line per broker. Needs Redis (and RabbitMQ for ``amqp``).

    python benchmarks/bench_wove_celery.py [--broker redis|amqp|both] [--seq 200]
                                           [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "celery"))

from bench_celery import native_calls  # noqa: E402
from common import Side, bench_arguments, emit, hub_side, record_of, settings_of, three_way  # noqa: E402

WORKERS = str(HERE / "wove_workers")


def bench(broker: str, args: Any) -> dict[str, Any]:
    from celery_services import CeleryService

    from wove_adapters.integration.hub import Hub

    service = CeleryService(broker, concurrency=args.concurrency,
                            log_dir=Path(tempfile.mkdtemp(prefix="bench-wove-celery-")))
    service.start(app_module="wove_celery_app")
    native_app = service.client_app()
    wove_app = service.client_app()
    hub = Hub(environments={"bench": {"executor": "celery",
                                      "executor_config": service.executor_config}},
              default_environment="bench")
    wove_config = {"app": wove_app, "queue": service.queue,
                   "task_name": "wove.run_backend_payload"}
    try:
        sides = [Side("native", *native_calls(native_app, service.queue)), hub_side(hub)]
        measured, notes = three_way(sides, args, f"celery+{broker}", "celery", wove_config,
                                    weave=True)
    finally:
        hub.close()
        native_app.close()
        wove_app.close()
        service.stop()
        service.cleanup()
    return record_of(
        f"celery+{'redis' if broker == 'redis' else 'rabbitmq'}", measured,
        **notes,
        settings=settings_of(args, worker_concurrency=args.concurrency, pool="prefork"),
    )


def main() -> None:
    parser = bench_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "amqp", "both"], default="both")
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-celery-"))
    # CeleryService puts its own directory first on the worker's PYTHONPATH; ours after.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [WORKERS, *filter(None, [os.environ.get("PYTHONPATH")])])
    for broker in (["redis", "amqp"] if args.broker == "both" else [args.broker]):
        emit(bench(broker, args))


if __name__ == "__main__":
    main()
