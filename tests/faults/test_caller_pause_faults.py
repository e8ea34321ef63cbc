"""A paused caller (SIGSTOP for ``PAUSE`` seconds, heartbeats every ``HEARTBEAT``): its
runs keep executing and finish while it cannot read a thing. When it resumes, the events
that wait on its sockets are the truth: no finished run is declared lost (``fail``), none
runs twice (``requeue``). The suite's small version of helper A's core test (issue 11,
item 1).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fault_tasks
import faults
import pytest

RUNS = 12
TASK_SECONDS = 1.0
HEARTBEAT = 2.5
PAUSE = 8.0
RESULT_BOUND = 60.0


@pytest.mark.parametrize("policy", ["requeue", "fail"])
def test_caller_sigstop(policy: str, caller: Callable[..., faults.Caller], markers: Path,
                        sqlite_ledger: str) -> None:
    started = time.monotonic()
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(RUNS)]
    program = caller(faults.SUBMIT_AND_WAIT, {
        "environment": {"executor": "process", "executor_config": {"env": faults.task_env()},
                        "delivery_orphan_policy": policy,
                        "delivery_heartbeat_seconds": HEARTBEAT},
        "ledger": sqlite_ledger, "tags": tags, "markers": str(markers),
        "seconds": TASK_SECONDS, "bound": RESULT_BOUND,
    }).start()
    program.wait_records("submitted", RUNS, 60)
    faults.wait_until(lambda: len(faults.running(markers)) >= RUNS // 2, 60,
                      "half of the runs executing")
    program.pause()
    time.sleep(PAUSE)  # every run finishes (and reports) while the caller is stopped
    program.resume()
    assert program.wait(RESULT_BOUND + 30) == 0, program.errors()[-3000:]
    counts = faults.Counts(f"caller SIGSTOP {PAUSE:.0f}s, heartbeat {HEARTBEAT}s: "
                           f"process, {policy}")
    faults.count_records(counts, program.records("result"),
                         {tag: fault_tasks.expected(tag) for tag in tags})
    faults.count_executions(counts, markers, tags)  # nothing was killed: once each
    faults.check(counts, started)
