"""RQ: can wove 2.0.3's RQ adapter run a task at all, against a real RQ 2.x worker?

wove's adapter enqueues ``wove.integrations.worker.run(payload)`` with ``job_id`` set to
wove's run id (``<task>:<uuid hex>``); RQ >= 2.0 accepts only letters, digits, ``_`` and
``-`` in job ids. This script starts a real ``rq worker`` (plain ``rq.Worker``, which is
all wove's adapter needs on the worker side), sends one task through wove's adapter,
and prints one JSON line with the outcome. When wove's adapter does run (an RQ release
that accepts the id), it measures native vs ours vs wove interleaved like the others.

    python benchmarks/bench_wove_rq.py [--seq 200] [--burst 1000] [--rounds 3]
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from bench_rq import REDIS_URL, Native, cleanup, start_workers, stop_workers  # noqa: E402


def main() -> None:
    args = common.bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-rq-"))
    from rq import __version__ as rq_version

    from wove_adapters.integration.hub import Hub

    queue = f"wove-bench-rq-{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix="bench-wove-rq-"))
    procs = start_workers(queue, 1, log_dir, "wove_adapters.adapters.rq.Worker")
    wove_config = {"redis_url": REDIS_URL, "queue_name": queue}
    record: dict[str, Any]
    try:
        failure = common.wove_attempt("rq", wove_config, timeout=30)
        if failure is not None:
            record = {
                "backend": "rq", "native": None, "ours": None, "wove": None,
                "wove_note": f"{failure} (rq {rq_version}: since RQ 2.0 a job id may hold "
                             "only letters, digits, '_' and '-', and wove passes its run id "
                             "'<task>:<hex>' as the job id)",
            }
        else:
            native = Native(queue)
            hub = Hub(environments={"rq": {"executor": "rq", "executor_config": {
                "redis_url": REDIS_URL, "queue": queue}}}, default_environment="rq")
            wove = common.WoveRuntime("rq", wove_config)
            try:
                measured = common.interleave(
                    [common.Side("native", native.one, native.burst), common.hub_side(hub),
                     wove.side()],
                    seq=args.seq, burst=args.burst, rounds=args.rounds,
                    warmup=args.warmup, label="rq")
            finally:
                hub.close()
                wove.close()
                native.connection.close()
            record = common.record_of("rq", measured, settings=common.settings_of(args, workers=1))
    finally:
        stop_workers(procs)
        cleanup(queue)
    common.emit(record)


if __name__ == "__main__":
    main()
