"""``wove-adapters demo``: the main job runs clean, and its timing table separates the
mapped step's wall time from each task's run time on its worker and its queue wait."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ITEMS = 8


def test_demo_prints_no_warning_or_error_and_separate_timing_columns(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WOVE")}
    env.update({"WOVE_ADAPTERS_HOME": str(tmp_path / "home"), "COLUMNS": "100"})
    done = subprocess.run(
        [sys.executable, "-m", "wove_adapters.cli", "demo", "--items", str(ITEMS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    for word in ("warning", "error", "traceback", "failed", "exception"):
        assert word not in done.stdout.lower(), done.stdout

    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("step "))
    # Two header lines: wall / run / run / wait / wait over s / p50 ms / max ms / ...
    assert lines[header - 1].split() == ["wall", "run", "run", "wait", "wait"]
    assert lines[header].split() == ["step", "environment", "runs", "s", "p50", "ms", "max",
                                     "ms", "p50", "ms", "max", "ms"]
    rows = {line.split()[0]: line.split() for line in lines[header + 2:header + 6]}
    assert list(rows) == ["generate_logs", "split", "parse_chunk", "merge"]
    mapped = rows["parse_chunk"]
    assert mapped[1] == "demo-workers" and mapped[2] == str(ITEMS)
    wall, run_p50, run_max, wait_p50, wait_max = (float(x) for x in mapped[3:8])
    assert run_p50 <= run_max and wait_p50 <= wait_max
    # The mapped step's wall time covers every run, but is not their sum: they overlap on
    # worker processes, and each run's own time excludes its wait.
    assert run_max / 1000 <= wall
    assert wait_max / 1000 <= wall + 0.05
    summary = next(line for line in lines if line.startswith("mapped step:"))
    assert re.fullmatch(
        rf"mapped step: {ITEMS} runs on \d+ worker process\(es\), [\d.]+ s wall time", summary
    )
