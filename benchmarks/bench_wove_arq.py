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

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARQ_TESTS = HERE.parent / "tests" / "integration" / "arq"
WORKERS = HERE / "wove_workers"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ARQ_TESTS))

from arq_services import (  # noqa: E402
    REDIS_URL,
    SESSION,
    ArqWorker,
)
from bench_arq import native_and_ours  # noqa: E402
from common import Side, bench_arguments, emit, hub_side, record_of, settings_of, three_way  # noqa: E402


def start_worker(max_jobs: int, log_dir: Path) -> ArqWorker:
    """The tests' ArqWorker (a ServiceProcess) on this benchmark's settings module, which
    serves wove's task beside ours and the native one."""
    return ArqWorker(f"{SESSION}-wove-bench", log_dir, module="wove_arq_settings",
                     settings="WoveBenchSettings", cwd=WORKERS,
                     env={"WOVE_TEST_ARQ_MAX_JOBS": str(max_jobs),
                          "PYTHONPATH": os.pathsep.join([str(WORKERS), str(ARQ_TESTS)])}).start()


def main() -> None:
    parser = bench_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--max-jobs", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-arq-"))
    from arq.connections import RedisSettings

    worker = start_worker(args.max_jobs, Path(tempfile.mkdtemp(prefix="bench-wove-arq-")))
    wove_config = {"redis_settings": RedisSettings.from_dsn(REDIS_URL),
                   "queue_name": worker.queue}
    with native_and_ours(worker) as (native, hub):
        sides = [Side("native", *native), hub_side(hub)]
        measured, notes = three_way(sides, args, "arq", "arq", wove_config, weave=True)
    emit(record_of("arq", measured, **notes,
                   settings=settings_of(args, max_jobs=args.max_jobs, poll_delay_s=0.01)))


if __name__ == "__main__":
    main()
