"""Nothing lost at exit on a queue backend: the lifecycle programs against a real
``rq worker`` (see tests/support/lifecycle.py and tests/integration/core/test_lifecycle.py).

RQ is the queue backend here because its worker forks per job and keeps running when the
caller has gone, so a detached run's outcome is written by the worker after the caller
exited; every other scenario must leave its runs final in the ledger, with empty stderr.
"""

from __future__ import annotations

import concurrent.futures
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from lifecycle import problems_of, programs, run_program


def test_no_rq_run_is_lost_at_exit(rq_environment: dict[str, Any], tmp_path: Path) -> None:
    selected = programs("rq", rq_environment, policies=("fail",), detach=True)
    ledger_path = tmp_path / "runs.db"
    # The programs share the rq worker's WOVE_ADAPTERS_HOME (its signing keys live there).
    env = {"PYTHONWARNINGS": "default"}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(
            lambda p: run_program(p, tmp_path, f"sqlite:///{ledger_path}", env=env), selected))
    failed = {o.program.name: found for o in outcomes
              if (found := problems_of(o, ledger_path))}
    assert not failed, failed
    assert len(outcomes) == len(selected) == 10
