"""The pending check (runs that never start) must not call a waiting run gone.

The fault suite (tests/faults/test_celery_faults.py) proves it finds the runs a dead
worker or a restarted broker lost; these tests prove the other half on a live worker:
messages prefetched behind a long task, or queued behind them, stay pending through
many snapshots, and a run that is really running is left alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from celery_services import CeleryService

from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks


def _hub(service: CeleryService, **settings: Any) -> Hub:
    config = {**service.executor_config, "reconcile_seconds": 0.5}
    environment = {"executor": "celery", "executor_config": config, **settings}
    return Hub(environments={"c": environment}, default_environment="c")


def test_prefetched_and_queued_runs_behind_a_long_task_are_not_gone(
    redis_celery: CeleryService, tmp_path: Path
) -> None:
    """One worker child, busy 9 s: the runs behind it wait prefetched (unacked, reserved
    at the worker) or queued, well past the check's minimum age and through many
    snapshots. With ``fail``, one false verdict would fail its run."""
    began = time.monotonic()
    with _hub(redis_celery, delivery_orphan_policy="fail") as hub:
        long = hub.submit(tasks.sleepy, str(tmp_path), "long", 9.0)
        while not (tmp_path / "long.started").exists():
            assert time.monotonic() - began < 60, "the worker never started the long task"
            time.sleep(0.02)
        waiting = [hub.submit(tasks.add, i) for i in range(12)]
        assert long.result(timeout=90) == "long"
        assert [f.result(timeout=60) for f in waiting] == [i + 1 for i in range(12)]
        stats = hub.dispatcher().stats
        # The check really looked (snapshots while the runs waited), and found them.
        check = hub.dispatcher().transport.adapter._pending  # type: ignore[attr-defined]
        assert check is not None and check.redis is True and check._seq >= 2, vars(check)
    assert stats.get("lost", 0) == 0, stats
