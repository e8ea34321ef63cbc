"""``require_ack`` cancels at volume on RQ: 100 runs on two workers, each cancelled with
``delivery_cancel_mode="require_ack"``: in five rounds, four while executing, then
sixteen more (ten at a time) while the workers take the next jobs from the queue. Every
cancel returns acknowledged (no ``CancelNotAcknowledgedError``), every future ends
cancelled, and no cancelled task runs to its end. Celery's twin lives in
test_celery_faults.py.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fault_tasks
import faults

RUNS = 100
TASK_SECONDS = 3.0  # a cancelled run must never get this far
BOUND = 120.0
ROUNDS = 5
RUNNING_PER_ROUND = 4  # cancelled while executing; the others while queued


def test_rq_require_ack_cancels(hub_for: Callable[..., Any], markers: Path,
                                private_redis: Callable[..., faults.RedisServer],
                                rq_worker: Callable[..., faults.RqWorkerProcess]) -> None:
    started = time.monotonic()
    broker = private_redis()
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    for _ in range(2):
        rq_worker(broker.url(), queue)
    hub = hub_for({"executor": "rq",
                   "executor_config": {"redis_url": broker.url(), "queue": queue},
                   "delivery_cancel_mode": "require_ack"})
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(RUNS)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, TASK_SECONDS)
               for tag in tags}
    counts = faults.Counts(f"{RUNS} require_ack cancels: rq (queued and running)")
    counts.runs = RUNS

    def cancel(tag: str) -> str | None:
        try:
            hub.cancel(futures[tag], mode="require_ack")
        except BaseException as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    # In ``ROUNDS`` rounds: ``RUNNING_PER_ROUND`` runs cancelled while they execute
    # (whichever a worker runs now; RQ takes the next from the queue at once), then as
    # many queued ones as make up the round, ten at a time, while the workers dequeue.
    refused: dict[str, str | None] = {}
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        for _ in range(ROUNDS):
            for _ in range(RUNNING_PER_ROUND):
                executing = faults.wait_until(
                    lambda: [t for t in faults.running(markers)
                             if t in futures and t not in refused],
                    60, "a run executing", interval=0.01)
                refused[executing[0]] = cancel(executing[0])
            # Not "queued" for sure: a worker may be taking one of them right now.
            queued = [tag for tag in tags if tag not in refused][:RUNS // ROUNDS
                                                                 - RUNNING_PER_ROUND]
            refused.update(zip(queued, pool.map(cancel, queued, timeout=BOUND), strict=True))
        rest = [tag for tag in tags if tag not in refused]
        refused.update(zip(rest, pool.map(cancel, rest, timeout=BOUND), strict=True))
    deadline = time.monotonic() + BOUND
    for tag in tags:
        kind, value = faults.outcome_of(futures[tag], deadline - time.monotonic())
        if refused[tag]:
            counts.problem("lost", f"{tag}: cancel not acknowledged: {refused[tag]}")
        elif kind == "hung":
            counts.problem("hung", f"{tag}: acknowledged, yet its future never settled")
        elif not isinstance(value, concurrent.futures.CancelledError):
            counts.problem("wrong", f"{tag}: cancelled, yet it gave {value!r}")
        else:
            counts.ok += 1
    # A task its cancel did not stop runs to its end (an end mark) within TASK_SECONDS.
    faults.wait_until(lambda: not faults.running(markers), TASK_SECONDS + 30,
                      "no cancelled task executing")
    ran_to_end = {m.tag for m in faults.read_marks(markers)
                  if m.event == "end" and m.tag in futures}
    for tag in sorted(ran_to_end):
        counts.problem("wrong", f"{tag}: acknowledged cancel, yet the task ran to its end")
    faults.count_executions(counts, markers, tags)
    print(f"executions cut by the cancel: {sum(faults.unfinished(markers).values())}")
    faults.check(counts, started)
