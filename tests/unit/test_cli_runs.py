"""``wove-adapters runs``: whole run ids at any width, doctor probes hidden unless asked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wove_adapters.cli import PROBE_TASK, main
from wove_adapters.core.ledger import open_ledger
from wove_adapters.core.ledger.base import FAILED, SUCCEEDED, RunRecord

# Ids as long as real ones (task name + uuid4 hex), and a longer one.
IDS = [
    "generate_monthly_revenue_report:3f9c2e7b1d4a4c0e9b8f6a5d4c3b2a19",
    "abs:26bee7d627a34252942f2aee9ab0b65d",
    "a_task_with_a_very_long_name_indeed_for_testing_widths:0123456789abcdef0123456789abcdef",
]
PROBE_ID = f"{PROBE_TASK}:aaaabbbbccccddddeeeeffff00001111"


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    ledger = open_ledger(url)

    async def fill() -> None:
        for run_id in [*IDS, PROBE_ID]:
            task = run_id.split(":")[0]
            await ledger.claim(RunRecord(run_id=run_id, environment="reports", task_id=task,
                                         adapter="celery"))
            await ledger.set_outcome(run_id, FAILED if "abs" in run_id else SUCCEEDED, None)

    asyncio.run(fill())
    return url


def run_cli(*args: str, columns: int = 40) -> subprocess.CompletedProcess[str]:
    """The installed command in its own process, stdout a pipe (not a terminal)."""
    env = {**os.environ, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    return subprocess.run(
        [sys.executable, "-m", "wove_adapters.cli", *args],
        capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.mark.parametrize("columns", [40, 80, 200])
def test_whole_run_ids_at_any_width_and_a_clean_stderr(url: str, columns: int) -> None:
    done = run_cli("runs", "--ledger", url, columns=columns)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    for run_id in IDS:
        # Each id whole, at the start of its own line: it pastes into `result` as is.
        assert any(line.startswith(run_id + " ") for line in lines), (run_id, done.stdout)
    assert "…" not in done.stdout and "..." not in done.stdout


def test_doctor_probes_are_hidden_unless_asked(url: str) -> None:
    done = run_cli("runs", "--ledger", url)
    assert PROBE_ID not in done.stdout
    assert "(1 doctor probe run(s) hidden: --all shows them)" in done.stdout
    everything = run_cli("runs", "--ledger", url, "--all")
    assert everything.returncode == 0 and everything.stderr == ""
    assert any(line.startswith(PROBE_ID + " ") for line in everything.stdout.splitlines())
    assert "probe run(s) hidden" not in everything.stdout


def test_json_lists_the_same_runs(url: str) -> None:
    result = CliRunner().invoke(main, ["runs", "--ledger", url, "--format", "json"])
    assert result.exit_code == 0, result.output
    assert sorted(r["run_id"] for r in json.loads(result.stdout)) == sorted(IDS)
    result = CliRunner().invoke(main, ["runs", "--ledger", url, "--format", "json", "--all"])
    assert PROBE_ID in {r["run_id"] for r in json.loads(result.stdout)}


def test_limit_counts_visible_runs_when_probes_fill_the_newest_rows(tmp_path: Path) -> None:
    """Probes newer than every real run must not leave `runs --limit 2` empty."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    ledger = open_ledger(url)

    async def fill() -> None:
        for n in range(3):
            await ledger.claim(RunRecord(run_id=f"real:{n}", environment="e", task_id="real",
                                         created_at=1000.0 + n))
        for n in range(10):
            await ledger.claim(RunRecord(run_id=f"{PROBE_TASK}:{n}", environment="e",
                                         task_id=PROBE_TASK, created_at=2000.0 + n))

    asyncio.run(fill())
    result = CliRunner().invoke(main, ["runs", "--ledger", url, "--limit", "2"])
    assert result.exit_code == 0, result.output
    shown = [line.split()[0] for line in result.stdout.splitlines()[2:] if line.startswith("real:")]
    assert shown == ["real:2", "real:1"]
