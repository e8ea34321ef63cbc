"""Caller processes for the task-control tests: each is a real program with its own Hub on
a shared ledger, and the work it submits records, on the worker side, when it ran.

``start_callers`` starts N callers at once, ``recorded`` reads the runs the workers wrote;
``peak`` is the most runs of one key that executed at the same moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TASK = r"""
def controlled(key, call, record_dir, seconds):
    # Runs on the worker: its start, then one line per run at its end (O_APPEND lines).
    import os, time
    started = time.time()
    with open(os.path.join(record_dir, "starts"), "a") as out:
        out.write(f"{key} {started:.6f}\n")
    time.sleep(seconds)
    line = f"{key} {started:.6f} {time.time():.6f} {os.getpid()}\n"
    with open(os.path.join(record_dir, "runs"), "a") as out:
        out.write(line)
    return call
"""

CALLER = TASK + r"""
import json, sys, time
from wove_adapters import Hub

ledger, environment, tasks, count, record_dir, seconds, tag = sys.argv[1:]
environment, tasks = json.loads(environment), json.loads(tasks)
with Hub(environments={"e": environment}, default_environment="e", ledger=ledger,
         tasks=tasks) as hub:
    print("ready", flush=True)
    sys.stdin.readline()
    started = time.time()
    futures = [
        hub.submit(controlled, f"k{i % 3}", f"{tag}-{i}", record_dir, float(seconds),
                   task_options={"task_name": "controlled"})
        for i in range(int(count))
    ]
    values = [future.result(timeout=600) for future in futures]
    print(json.dumps({"values": values, "seconds": time.time() - started}), flush=True)
"""


def task() -> Any:
    """The recording task, defined outside any importable module so it travels by value
    (a worker needs nothing of the test suite on its path)."""
    namespace: dict[str, Any] = {}
    exec(compile(TASK, "<controls task>", "exec"), namespace)
    return namespace["controlled"]


def start_callers(
    n: int, *, ledger: str, environment: dict[str, Any], tasks: dict[str, Any], count: int,
    record_dir: Path, seconds: float,
) -> list[subprocess.Popen[str]]:
    """N callers, each ready (its Hub open) before any submits: they start together."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", CALLER, ledger, json.dumps(environment), json.dumps(tasks),
             str(count), str(record_dir), str(seconds), f"c{i}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, start_new_session=True,
        )
        for i in range(n)
    ]
    for caller in callers:
        assert caller.stdout is not None
        line = caller.stdout.readline()
        if line.strip() != "ready":
            error = caller.stderr.read() if caller.stderr else ""
            raise AssertionError(f"caller did not start: {line!r} {error}")
    for caller in callers:
        assert caller.stdin is not None
        caller.stdin.write("go\n")
        caller.stdin.flush()
    return callers


def three_callers(
    ledger: str, environment: dict[str, Any], tasks: dict[str, Any], record_dir: Path,
    *, count: int = 100, seconds: float = 0.005,
) -> tuple[list[tuple[str, float, float]], float]:
    """Three callers x ``count`` calls at once; each got its own values back, and every
    run executed exactly once. Returns the recorded runs and the wall time."""
    started = time.monotonic()
    callers = start_callers(3, ledger=ledger, environment=environment, tasks=tasks,
                            count=count, record_dir=record_dir, seconds=seconds)
    results = [finish(caller) for caller in callers]
    elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert result["values"] == [f"c{i}-{n}" for n in range(count)]
    runs = recorded(record_dir)
    assert len(runs) == 3 * count  # lost 0, duplicated 0
    return runs, elapsed


def finish(caller: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    out, err = caller.communicate(timeout=timeout)
    assert caller.returncode == 0, f"caller exited {caller.returncode}\n{out}\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def kill(caller: subprocess.Popen[str]) -> None:
    """SIGKILL the caller and what it started (its stdio workers): a crash, no cleanup."""
    os.killpg(caller.pid, signal.SIGKILL)
    caller.wait(timeout=30)


def recorded(record_dir: Path) -> list[tuple[str, float, float]]:
    path = record_dir / "runs"
    if not path.exists():
        return []
    runs = []
    for line in path.read_text().splitlines():
        key, started, ended, _pid = line.split()
        runs.append((key, float(started), float(ended)))
    return runs


def peak(runs: list[tuple[str, float, float]], *, per_key: bool) -> int:
    """The most runs (of one key, or of any key) executing at the same moment."""
    events: list[tuple[float, int, str]] = []
    for key, started, ended in runs:
        group = key if per_key else "*"
        events += [(started, 1, group), (ended, -1, group)]
    events.sort(key=lambda e: (e[0], e[1]))  # an end at the same instant comes first
    active: dict[str, int] = {}
    most = 0
    for _, step, group in events:
        active[group] = active.get(group, 0) + step
        most = max(most, active[group])
    return most


def starts(record_dir: Path) -> list[float]:
    path = record_dir / "starts"
    if not path.exists():
        return []
    return [float(line.split()[1]) for line in path.read_text().splitlines()]


def wait_for_runs(record_dir: Path, n: int, timeout: float) -> list[tuple[str, float, float]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = recorded(record_dir)
        if len(runs) >= n:
            return runs
        time.sleep(0.05)
    return recorded(record_dir)
