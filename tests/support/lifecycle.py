"""Short programs that use the API as documented and then exit, in every way a program
exits; and the check that none of their runs was lost.

Each program runs in a fresh interpreter with its own task name, so the check reads the
ledger file directly (plain ``sqlite3``, not our code) and finds every run the program
made, including mapped items and runs whose ids were never printed. A run counts as lost
when it is missing or left ``submitted`` / ``running``; a detached run must reach
``succeeded`` later, written by its worker after the caller has gone.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A task long enough that "exit without waiting" really leaves it in flight.
TASK_SECONDS = 0.3

HEADER = """\
import asyncio, json, sys, time
from wove_adapters import Hub

ENVIRONMENTS = json.loads({environments!r})
LEDGER = {ledger!r}
TASK = {task!r}

def work(x):
    time.sleep({seconds})
    return x * 2

def hub():
    return Hub(environments=ENVIRONMENTS, default_environment="main", ledger=LEDGER)

OPTIONS = {{"task_name": TASK}}
"""

# name -> (body, runs it makes, final states allowed, exit code)
SCENARIOS: dict[str, tuple[str, int, frozenset[str], int]] = {
    "with_run": ("""
with hub() as h:
    assert h.run(work, 1, task_options=OPTIONS) == 2
""", 1, frozenset({"succeeded"}), 0),
    "with_submit_no_wait": ("""
with hub() as h:
    h.submit(work, 1, task_options=OPTIONS)
""", 1, frozenset({"succeeded", "lost", "cancelled"}), 0),
    "no_with_submit_exit": ("""
h = hub()
h.submit(work, 1, task_options=OPTIONS)
h.submit(work, 2, task_options=OPTIONS)
""", 2, frozenset({"succeeded", "lost", "cancelled"}), 0),
    "sys_exit_mid": ("""
h = hub()
futures = [h.submit(work, i, task_options=OPTIONS) for i in range(3)]
futures[0].result()
sys.exit(3)
""", 3, frozenset({"succeeded", "lost", "cancelled"}), 3),
    "map_then_close": ("""
with hub() as h:
    assert h.map(work, range(4), task_options=OPTIONS) == [0, 2, 4, 6]
""", 4, frozenset({"succeeded"}), 0),
    "executor_without_shutdown": ("""
h = hub()
pool = h.executor(max_workers=2, task_name=TASK)
futures = [pool.submit(work, i) for i in range(4)]
""", 4, frozenset({"succeeded"}), 0),
    "async_with": ("""
async def main():
    async with hub() as h:
        assert await h.arun(work, 3, task_options=OPTIONS) == 6
        h.asubmit(work, 4, task_options=OPTIONS)
asyncio.run(main())
""", 2, frozenset({"succeeded", "lost", "cancelled"}), 0),
    "timeout_set": ("""
with Hub(environments={k: {**v, "delivery_timeout": 30} for k, v in ENVIRONMENTS.items()},
         default_environment="main", ledger=LEDGER) as h:
    assert h.run(work, 5, task_options=OPTIONS) == 10
""", 1, frozenset({"succeeded"}), 0),
    "two_hubs_one_closed": ("""
a, b = hub(), hub()
a.submit(work, 1, task_options=OPTIONS).result()
b.submit(work, 2, task_options=OPTIONS)
a.close()
""", 2, frozenset({"succeeded", "lost", "cancelled"}), 0),
}

DETACH = ("""
h = hub()
for i in range(3):
    print("RUN", h.submit(work, i, task_options=OPTIONS).run_id, flush=True)
""", 3, frozenset({"succeeded"}), 0)


@dataclass
class Program:
    name: str
    executor: str
    environment: dict[str, Any]
    body: str
    runs: int
    allowed: frozenset[str]
    exit_code: int
    task: str = field(default_factory=lambda: f"lc_{uuid.uuid4().hex[:12]}")


def programs(executor: str, environment: dict[str, Any], *,
             policies: Iterable[str] = ("fail", "cancel"), detach: bool = False) -> list[Program]:
    """Every scenario under each orphan policy (+ the detach scenario when supported)."""
    out = []
    for policy in policies:
        env = {**environment, "delivery_orphan_policy": policy}
        for name, (body, runs, allowed, code) in SCENARIOS.items():
            out.append(Program(f"{executor}-{policy}-{name}", executor, env, body, runs,
                               allowed, code))
    if detach:
        env = {**environment, "delivery_orphan_policy": "detach"}
        body, runs, allowed, code = DETACH
        out.append(Program(f"{executor}-detach-exit", executor, env, body, runs, allowed, code))
    return out


@dataclass
class Outcome:
    program: Program
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_program(program: Program, workdir: Path, ledger: str, *,
                env: dict[str, str] | None = None, timeout: float = 120.0) -> Outcome:
    source = HEADER.format(environments=json.dumps({"main": program.environment}),
                           ledger=ledger, task=program.task, seconds=TASK_SECONDS)
    source += textwrap.dedent(program.body)
    path = workdir / f"{program.name}.py"
    path.write_text(source)
    started = time.monotonic()
    # stdin/stdout/stderr are files, not pipes: a detached worker that inherits them must
    # not keep the test waiting for EOF.
    out_path, err_path = path.with_suffix(".out"), path.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.run([sys.executable, str(path)], cwd=workdir, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=err, env={**os.environ, **(env or {})},
                              timeout=timeout, check=False)
    return Outcome(program, proc.returncode, out_path.read_text(), err_path.read_text(),
                   time.monotonic() - started)


def ledger_rows(path: Path, task: str) -> list[tuple[str, str]]:
    with sqlite3.connect(path, timeout=10) as conn:
        return list(conn.execute("SELECT run_id, state FROM runs WHERE task_id = ?", (task,)))


def problems_of(outcome: Outcome, ledger_path: Path, *, settle_seconds: float = 30.0) -> list[str]:
    """What went wrong with one program: empty when nothing was lost and nothing printed."""
    program = outcome.program
    found: list[str] = []
    if outcome.returncode != program.exit_code:
        found.append(f"exit code {outcome.returncode}, expected {program.exit_code}")
    if outcome.stderr.strip():
        found.append(f"stderr not empty: {outcome.stderr.strip()[-1500:]}")
    deadline = time.monotonic() + settle_seconds
    while True:
        rows = ledger_rows(ledger_path, program.task)
        states = [state for _, state in rows]
        unsettled = [s for s in states if s not in program.allowed]
        if (len(rows) >= program.runs and not unsettled) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(rows) != program.runs:
        found.append(f"{len(rows)} runs in the ledger, expected {program.runs}: {rows}")
    if unsettled:
        found.append(f"runs not in a final state {sorted(program.allowed)}: {rows}")
    return found
