"""Point 5 of issue 10 on Dask: a worker never blocks on the way back.

Caller A (a fresh interpreter) submits a task pinned to one worker thread and vanishes
while it runs (``os._exit``: its receiver's port closes). When A's task ends, the worker
cannot deliver its outcome. Before: the Dask thread retried for 120 s and the next run on
that worker (caller B) waited behind it (measured: 119.5 s). Now the outcome goes to the
worker's background outbox, which records it in the shared ledger, and B's task starts
at once.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from dask_cluster_helpers import DaskCluster, wait_for_workers

from wove_adapters.core.codec import decode_outcome
from wove_adapters.core.ledger import RunRecord, open_ledger
from wove_adapters.integration.hub import Hub

CALLER_A = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from wove_adapters.integration.hub import Hub

    def slow(directory, tag):
        Path(directory, tag + ".started").write_text(str(time.time()))
        time.sleep(1.0)
        Path(directory, tag + ".finished").write_text(str(time.time()))
        return tag

    if __name__ == "__main__":
        address, target, directory, ledger = sys.argv[1:5]
        hub = Hub(environments={"a": {"executor": "dask", "executor_config": {
                      "address": address,
                      "task_options": {"workers": [target], "allow_other_workers": False}}}},
                  default_environment="a", ledger=ledger)
        future = hub.submit(slow, directory, "a")
        print(future.run_id, flush=True)
        deadline = time.monotonic() + 60
        while not Path(directory, "a.started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0)  # gone without a word: receiver, client and all
''')


def started_at(directory: str, tag: str) -> float:
    now = time.time()
    Path(directory, f"{tag}.started").write_text(str(now))
    return now


@pytest.fixture
def address(dask_cluster: DaskCluster) -> str:
    wait_for_workers(dask_cluster.address)
    return dask_cluster.address


async def _wait_record(ledger_url: str, run_id: str, timeout: float) -> RunRecord | None:
    ledger = open_ledger(ledger_url)
    deadline = time.monotonic() + timeout
    record = await ledger.get(run_id)
    while (record is None or record.outcome is None) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        record = await ledger.get(run_id)
    return record


def test_gone_caller_does_not_hold_the_worker(address: str, tmp_path: Path) -> None:
    from distributed import Client

    with Client(address, timeout=30) as client:
        target = sorted(client.scheduler_info()["workers"])[0]
    markers = tmp_path / "markers"
    markers.mkdir()
    ledger_url = f"sqlite:///{tmp_path / 'runs.db'}"
    script = tmp_path / "caller_a.py"
    script.write_text(CALLER_A)
    gone = subprocess.run(
        [sys.executable, str(script), address, target, str(markers), ledger_url],
        capture_output=True, text=True, timeout=120,
    )
    assert gone.returncode == 0, gone.stderr
    run_a = gone.stdout.strip()
    assert run_a.startswith("slow:"), gone.stdout

    hub = Hub(environments={"b": {"executor": "dask", "executor_config": {
        "address": address,
        "task_options": {"workers": [target], "allow_other_workers": False}}}},
        default_environment="b", ledger=ledger_url)
    try:
        options: dict[str, Any] = {"delivery_timeout": 60}
        b_started = hub.run(started_at, str(markers), "b", task_options=options)
    finally:
        hub.close()
    a_finished = float((markers / "a.finished").read_text())
    # The thread was free as soon as A's task ended (before: 120 s of retries).
    assert b_started - a_finished < 1.0, b_started - a_finished

    record = asyncio.run(_wait_record(ledger_url, run_a, 15))
    assert record is not None and record.outcome is not None, record
    assert record.state == "succeeded"
    frame = decode_outcome(record.outcome, run_a)
    assert frame["type"] == "task_result" and frame["result"] == "a"
