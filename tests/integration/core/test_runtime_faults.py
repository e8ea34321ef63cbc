"""Faults of the caller itself, measured with real worker processes.

A caller paused with SIGSTOP (a GC pause, a blocked loop, a laptop lid) must not turn runs
that finished, or kept running, into lost ones: events already on their way are read
before any verdict, and silence is counted only while the caller was running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

CALLER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    from wove_adapters import Hub

    directory, executor, policy, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


    def work(directory: str, index: int, seconds: float) -> int:
        # One line per execution: O_APPEND of a short line is atomic.
        with open(os.path.join(directory, "executions.log"), "a") as handle:
            handle.write(f"{index} {os.getpid()}\\n")
        time.sleep(seconds)
        return index * index


    config = {"processes": count} if executor == "stdio" else {}
    hub = Hub(
        environments={"w": {
            "executor": executor,
            "executor_config": config,
            "delivery_heartbeat_seconds": 2.0,
            "delivery_orphan_policy": policy,
        }},
        default_environment="w",
        ledger=f"sqlite:///{directory}/runs.db",
    )
    outcomes = {}
    started = time.monotonic()
    with hub:
        # Spread over the pause: most end while the caller is stopped, the longest run on
        # after it (their heartbeats must be heard again).
        futures = {i: hub.submit(work, directory, i, 1.0 + (i % 10) * 1.2) for i in range(count)}
        Path(directory, "submitted").write_text("yes")
        for index, future in futures.items():
            try:
                outcomes[index] = ["ok", future.result(timeout=120)]
            except BaseException as exc:
                outcomes[index] = [type(exc).__name__, str(exc)[:300]]
        stats = dict(hub.dispatcher("w").stats)
    Path(directory, "outcomes.json").write_text(json.dumps(
        {"outcomes": outcomes, "stats": stats, "seconds": time.monotonic() - started}))
    """
)


def _executions(directory: Path) -> Counter[int]:
    log = directory / "executions.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(int(line.split()[0]) for line in lines if line.strip())


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("executor", ["process", "stdio"])
@pytest.mark.parametrize("policy", ["requeue", "fail"])
def test_a_paused_caller_loses_no_run(tmp_path: Path, executor: str, policy: str) -> None:
    count = 50 if executor == "process" else 24
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = {**os.environ, "WOVE_ADAPTERS_HOME": str(tmp_path / "home")}
    caller = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), executor, policy, str(count)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    began = time.monotonic()
    try:
        # Pause once every run has started: the shortest end during the pause, the
        # longest run across it.
        _wait(lambda: len(_executions(tmp_path)) >= count, 90, "every run to start")
        time.sleep(0.5)
        os.kill(caller.pid, signal.SIGSTOP)
        time.sleep(8.0)
        os.kill(caller.pid, signal.SIGCONT)
        output, _ = caller.communicate(timeout=150)
    finally:
        if caller.poll() is None:
            os.kill(caller.pid, signal.SIGCONT)
            caller.kill()
            caller.wait()
    elapsed = time.monotonic() - began
    text = output.decode(errors="replace")
    report = json.loads((tmp_path / "outcomes.json").read_text())
    outcomes = {int(k): v for k, v in report["outcomes"].items()}
    executions = _executions(tmp_path)
    wrong = {i: o for i, o in outcomes.items() if o != ["ok", i * i]}
    orphaned = [i for i, o in outcomes.items() if o[0] == "DeliveryOrphanedError"]
    twice = {i: n for i, n in executions.items() if n != 1}
    summary = (
        f"{executor}/{policy}: lost={report['stats'].get('lost')} "
        f"requeued={report['stats'].get('requeued')} orphaned={len(orphaned)} "
        f"stalls-seen={report['stats'].get('caller_stalls')} "
        f"executed-not-once={len(twice)} wrong={len(wrong)} in {elapsed:.1f}s"
    )
    print(summary)
    assert len(outcomes) == count, text
    assert report["stats"]["lost"] == 0, summary
    assert orphaned == [], summary
    assert twice == {} and len(executions) == count, summary
    assert wrong == {}, f"{summary}: {dict(list(wrong.items())[:5])}"
    assert elapsed < 90, summary
