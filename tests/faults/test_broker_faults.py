"""The broker dies mid-burst and comes back: a private ``redis-server`` (the RQ queue)
is SIGKILLed while runs are queued and running, stays down for ``OUTAGE`` seconds and is
restarted, without persistence (the queue comes back empty) and with AOF (it comes back
as acknowledged). An RQ worker exits when Redis goes away; the test restarts it as an
operator would. Under ``requeue`` + heartbeats every run gives exactly one correct result.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fault_tasks
import faults
import pytest

RUNS = 24
TASK_SECONDS = 0.3
HEARTBEAT = 2.0
OUTAGE = 3.0
RESULT_BOUND = 90.0


@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof"])
def test_rq_broker_kill_and_restart(aof: bool, hub_for: Callable[..., Any], markers: Path,
                                    private_redis: Callable[..., faults.RedisServer],
                                    rq_worker: Callable[..., faults.RqWorkerProcess]) -> None:
    started = time.monotonic()
    broker = private_redis(aof=aof)
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    workers = [rq_worker(broker.url(), queue), rq_worker(broker.url(), queue)]
    hub = hub_for({"executor": "rq",
                   "executor_config": {"redis_url": broker.url(), "queue": queue},
                   "delivery_orphan_policy": "requeue",
                   "delivery_heartbeat_seconds": HEARTBEAT})
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(RUNS)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, TASK_SECONDS)
               for tag in tags}
    # Mid-burst: some done, some running, most still queued.
    faults.wait_until(lambda: sum(faults.executions(markers).values()) >= 4, 60,
                      "4 executions before the outage")
    broker.kill()
    time.sleep(OUTAGE)
    broker.start()
    for worker in workers:  # an RQ worker exits without its Redis; the operator restarts it
        if worker.proc.poll() is None:
            worker.kill()
    workers += [rq_worker(broker.url(), queue), rq_worker(broker.url(), queue)]
    counts = faults.Counts(f"broker kill {OUTAGE:.0f}s + restart: rq "
                           f"({'AOF' if aof else 'no persistence'})")
    faults.count_futures(counts, futures, {tag: fault_tasks.expected(tag) for tag in tags},
                         timeout=RESULT_BOUND)
    faults.count_executions(counts, markers, tags, allowed=faults.allowed_after_kills(markers))
    faults.check(counts, started)
