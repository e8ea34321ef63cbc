"""A caller killed (SIGKILL) with runs in flight, on each shared ledger: early (0.3 s
after its last ``submit`` returned: jobs launching, claims in flight) and late (while its
runs execute). Workers outlive it (process workers run in their own sessions). Whatever
executed must be fetchable afterwards by anyone who opens the ledger: a new Hub in this
process reads every such run's result (issue 11, item 3: a run id is a durable promise).

Also: a caller restarted on the same ``callback_port`` and ``callback_token`` must not
swallow the old runs' events; every old run is fetchable (issue 11, item 4).
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
import pytest

from wove_adapters.integration.hub import Hub

RUNS = 12
OLD_TASK_SECONDS = 4.0  # the old runs end after the restarted caller took the port
FETCH_BOUND = 45.0
LEDGERS = ["sqlite", "redis", "postgres"]


def _environment(**settings: Any) -> dict[str, Any]:
    return {"executor": "process", "executor_config": {"env": faults.task_env()}, **settings}


def fetch_all(counts: faults.Counts, ledger_url: str, runs: dict[str, str]) -> None:
    """Tally ``hub.result`` of every run (tag -> run id) from a new Hub on the ledger."""
    reader = Hub(ledger=ledger_url)
    try:
        deadline = time.monotonic() + FETCH_BOUND
        counts.runs += len(runs)
        for tag, run_id in runs.items():
            try:
                value = reader.result(run_id, timeout=max(0.0, deadline - time.monotonic()))
                faults.tally(counts, tag, "ok", value, fault_tasks.expected(tag))
            except (TimeoutError, concurrent.futures.TimeoutError) as exc:
                counts.problem("hung", f"{tag} {run_id}: {exc}")
            except BaseException as exc:
                faults.tally(counts, tag, "error", exc, None)
    finally:
        reader.close()


def _executed_runs(program: faults.Caller, markers: Path) -> dict[str, str]:
    """Tag -> run id of every submitted run that started executing, once every execution
    has ended (workers deliver or record, then exit)."""
    seen = faults.wait_quiet(markers)
    return {r["tag"]: r["run_id"] for r in program.records("submitted") if seen[r["tag"]]}


@pytest.mark.parametrize("ledger_url", LEDGERS, indirect=True)
@pytest.mark.parametrize("moment", ["early", "late"])
def test_caller_sigkill(moment: str, ledger_url: str, caller: Callable[..., faults.Caller],
                        markers: Path) -> None:
    started = time.monotonic()
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(RUNS)]
    program = caller(faults.SUBMIT_AND_WAIT, {
        "environment": _environment(delivery_orphan_policy="fail"),
        "ledger": ledger_url, "tags": tags, "markers": str(markers),
        "seconds": 0.5 if moment == "early" else 1.5, "bound": 120, "hold": True,
    }).start()
    program.wait_records("submitted", RUNS, 60)
    if moment == "early":  # as soon as one run executes: the others just starting
        faults.wait_until(lambda: faults.running(markers), 60, "a run executing")
    else:
        faults.wait_until(lambda: len(faults.running(markers)) >= RUNS // 2, 60,
                          "half of the runs executing")
    program.kill()
    runs = _executed_runs(program, markers)
    assert runs, "nothing executed: the scenario proves nothing"
    counts = faults.Counts(f"caller SIGKILL {moment}: process + {ledger_url.split(':')[0]} "
                           "ledger (executed runs fetchable)")
    fetch_all(counts, ledger_url, runs)
    faults.count_executions(counts, markers, list(runs))
    faults.check(counts, started)


def test_caller_restart_on_fixed_port(caller: Callable[..., faults.Caller], markers: Path,
                                      sqlite_ledger: str,
                                      private_redis: Callable[..., faults.RedisServer],
                                      rq_worker: Callable[..., faults.RqWorkerProcess]) -> None:
    """The first caller dies with ``requeue`` runs executing on RQ workers (long-lived
    workers: no exit flush); a second one takes the same port and token at once. The old
    runs' workers reach the new caller, which does not know them: it must say so, and the
    workers record their outcomes in the ledger."""
    started = time.monotonic()
    broker = private_redis()
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    for _ in range(RUNS // 2):
        rq_worker(broker.url(), queue)
    port, token = faults.free_port(), uuid.uuid4().hex
    environment = {"executor": "rq", "delivery_orphan_policy": "requeue",
                   "delivery_heartbeat_seconds": 2.0,
                   "executor_config": {"redis_url": broker.url(), "queue": queue,
                                       "callback_port": port, "callback_token": token}}
    prefix = uuid.uuid4().hex[:6]
    old = [f"{prefix}-old-{i}" for i in range(RUNS)]
    first = caller(faults.SUBMIT_AND_WAIT, {
        "environment": environment, "ledger": sqlite_ledger, "tags": old,
        "markers": str(markers), "seconds": OLD_TASK_SECONDS, "bound": 120, "hold": True,
    }).start()
    first.wait_records("submitted", RUNS, 60)
    faults.wait_until(lambda: len(faults.running(markers)) >= RUNS // 2, 90,
                      "half of the old runs executing")
    first.kill()
    new = [f"{prefix}-new-{i}" for i in range(4)]
    second = caller(faults.SUBMIT_AND_WAIT, {
        "environment": environment, "ledger": sqlite_ledger, "tags": new,
        "markers": str(markers), "seconds": 0.2, "bound": 60,
    }).start()
    second.wait_records("submitted", len(new), 60)  # its receiver is up on the port
    assert any(tag in faults.running(markers) for tag in old), (
        "every old run ended before the new caller took the port: nothing was tested")
    runs = _executed_runs(first, markers)
    assert second.wait(90) == 0, second.errors()[-3000:]
    counts = faults.Counts("caller restart on a fixed callback_port: old runs fetchable, "
                           "new runs ok")
    fetch_all(counts, sqlite_ledger, runs)
    faults.count_records(counts, second.records("result"),
                         {tag: fault_tasks.expected(tag) for tag in new})
    faults.count_executions(counts, markers, [*runs, *new])
    faults.check(counts, started)
