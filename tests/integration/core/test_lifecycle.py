"""Nothing lost at exit: fresh interpreters that submit and exit in every documented way.

Each program's runs must all be in the ledger in a final state (detached runs finish later,
written by their worker), its stderr must be empty, and its exit code its own. This is the
caller's side of "what a run id promises" (DESIGN), checked on local, stdio and process.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from lifecycle import Outcome, Program, problems_of, programs, run_program

EXECUTORS = {
    "local": {"executor": "local"},
    "stdio": {"executor": "stdio", "executor_config": {"processes": 2}},
    "process": {"executor": "process"},
}
ALL = [
    *programs("local", EXECUTORS["local"]),
    *programs("stdio", EXECUTORS["stdio"]),
    *programs("process", EXECUTORS["process"], detach=True),
]


def _run_all(selected: list[Program], tmp_path: Path) -> tuple[list[Outcome], Path]:
    ledger_path = tmp_path / "runs.db"
    ledger = f"sqlite:///{ledger_path}"
    env = {"WOVE_ADAPTERS_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "default"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda p: run_program(p, tmp_path, ledger, env=env), selected))
    return outcomes, ledger_path


@pytest.mark.parametrize("executor", sorted(EXECUTORS))
def test_no_run_is_lost_at_exit(executor: str, tmp_path: Path) -> None:
    selected = [p for p in ALL if p.executor == executor]
    outcomes, ledger_path = _run_all(selected, tmp_path)
    report = {o.program.name: problems_of(o, ledger_path) for o in outcomes}
    failed = {name: found for name, found in report.items() if found}
    assert not failed, failed
    assert len(outcomes) == len(selected) >= 17


def test_at_least_fifty_programs() -> None:
    assert len(ALL) >= 50


def test_detached_result_is_fetched_by_the_cli_after_the_caller_exits(tmp_path: Path) -> None:
    detach = next(p for p in ALL if p.name == "process-detach-exit")
    outcomes, ledger_path = _run_all([detach], tmp_path)
    assert problems_of(outcomes[0], ledger_path) == []
    run_ids = [line.split()[1] for line in outcomes[0].stdout.splitlines()
               if line.startswith("RUN ")]
    assert len(run_ids) == 3
    for index, run_id in enumerate(run_ids):
        cli = subprocess.run(
            [sys.executable, "-m", "wove_adapters.cli", "result", run_id,
             "--ledger", f"sqlite:///{ledger_path}", "--wait", "30"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "WOVE_ADAPTERS_HOME": str(tmp_path / "home")},
        )
        assert cli.returncode == 0, cli.stderr
        assert cli.stdout.strip().splitlines()[-1] == str(index * 2)
