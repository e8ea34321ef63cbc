"""Task controls on Celery: three caller processes, a prefork worker of four processes
(so a broken limit would show as overlapping runs), the shared Redis as the ledger."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import controls_callers as cc
import shared_servers
from celery_services import CeleryService, running


@pytest.fixture(scope="module")
def wide_celery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryService]:
    yield from running("redis", tmp_path_factory.mktemp("celery"), concurrency=4)


@pytest.mark.parametrize("mode", ["task", "keys"])
def test_the_limit_holds_across_three_callers_on_celery(
    wide_celery: CeleryService, tmp_path: Path, mode: str
) -> None:
    environment = {"executor": "celery", "executor_config": wide_celery.executor_config}
    tasks = {"controlled": {"concurrency_control": mode, "key_arguments": ["key"]}}
    name = f"wove_controls_celery_{os.getpid()}_{mode}"
    with shared_servers.ledger("redis", name, tmp_path, suite="task controls") as ledger:
        runs, elapsed = cc.three_callers(ledger, environment, tasks, tmp_path)
    assert cc.peak(runs, per_key=mode == "keys") == 1
    print(f"\ncelery, {mode}: 300 runs in {elapsed:.1f} s; at most "
          f"{cc.peak(runs, per_key=False)} at once overall")


def test_max_pending_seconds_fires_on_a_queue_with_no_worker(
    wide_celery: CeleryService, tmp_path: Path
) -> None:
    from wove_adapters import Hub
    from wove_adapters.core.errors import DeliveryOrphanedError

    config = {**wide_celery.executor_config, "queue": f"{wide_celery.queue}-nobody",
              "pending_check": False}  # no start-up refusal: the run must wait unseen
    with Hub(environments={"e": {"executor": "celery", "executor_config": config}},
             default_environment="e", ledger=f"sqlite:///{tmp_path}/runs.db",
             tasks={"controlled": {"max_pending_seconds": 2.0,  # the seed's name
                                   "delivery_orphan_policy": "fail"}}) as hub:
        started = time.monotonic()
        future = hub.submit(cc.task(), "k", "never", str(tmp_path), 0.0,
                            task_options={"task_name": "controlled"})
        with pytest.raises(DeliveryOrphanedError, match="not started within 2s"):
            future.result(timeout=60)
        waited = time.monotonic() - started
    assert 2.0 <= waited < 30, waited
    assert cc.recorded(tmp_path) == []
