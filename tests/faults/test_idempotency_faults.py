"""Idempotency races across processes: ``CALLERS`` caller programs, released at the same
instant, each submit ``PER_CALLER`` runs over the same ``KEYS`` idempotency keys, on a
shared Redis or PostgreSQL ledger. Each key executes exactly once, and every one of the
submissions gets that key's result.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import fault_tasks
import faults
import pytest

CALLERS = 10
PER_CALLER = 50
KEYS = 20
TASK_SECONDS = 0.3
RESULT_BOUND = 120.0

BODY = """
import concurrent.futures
with Hub(environments={"faults": PARAMS["environment"]}, default_environment="faults",
         ledger=PARAMS["ledger"]) as hub:
    while not os.path.exists(PARAMS["go"]):  # every caller starts submitting at once
        time.sleep(0.002)
    futures = []
    for j in range(PARAMS["per_caller"]):
        tag = PARAMS["keys"][(j + PARAMS["offset"]) % len(PARAMS["keys"])]
        futures.append((f"{PARAMS['name']}-{j}", tag,
                        hub.submit(fault_tasks.work, PARAMS["markers"], tag, PARAMS["seconds"])))
    deadline = time.monotonic() + PARAMS["bound"]
    for sub, tag, future in futures:
        try:
            value = future.result(timeout=max(0.0, deadline - time.monotonic()))
            emit(kind="result", sub=sub, tag=tag, run_id=future.run_id, value=value)
        except concurrent.futures.TimeoutError:
            emit(kind="result", sub=sub, tag=tag, hung=True)
        except BaseException as exc:
            emit(kind="result", sub=sub, tag=tag, error=f"{type(exc).__name__}: {exc}")
"""


@pytest.mark.parametrize("ledger_url", ["redis", "postgres"], indirect=True)
def test_idempotency_race(ledger_url: str, caller: Callable[..., faults.Caller], markers: Path,
                          tmp_path: Path) -> None:
    prefix = uuid.uuid4().hex[:8]
    keys = [f"{prefix}-k{i}" for i in range(KEYS)]
    go = tmp_path / "go"
    environment = {"executor": "process", "executor_config": {"env": faults.task_env()},
                   "delivery_idempotency_key": "idem-{tag}"}
    programs = [caller(BODY, {
        "environment": environment, "ledger": ledger_url, "go": str(go), "name": f"c{n}",
        "keys": keys, "offset": n, "per_caller": PER_CALLER, "markers": str(markers),
        "seconds": TASK_SECONDS, "bound": RESULT_BOUND,
    }, name=f"c{n}").start() for n in range(CALLERS)]
    time.sleep(1.0)  # the interpreters are up and waiting on the go file (not required)
    started = time.monotonic()
    go.touch()
    for program in programs:
        assert program.wait(RESULT_BOUND + 30) == 0, program.errors()[-3000:]
    counts = faults.Counts(f"idempotency race {CALLERS}x{PER_CALLER} over {KEYS} keys: "
                           f"process + {ledger_url.split(':')[0]} ledger")
    records = [r for program in programs for r in program.records("result")]
    expected = {f"c{n}-{j}": fault_tasks.expected(keys[(j + n) % KEYS])
                for n in range(CALLERS) for j in range(PER_CALLER)}
    faults.count_records(counts, records, expected, key="sub")
    faults.count_executions(counts, markers, keys)  # one execution per key
    seen = faults.executions(markers)
    assert all(seen[key] for key in keys), f"keys never executed: {seen}"
    faults.check(counts, started)
