"""The runs page over a real Celery worker's runs (docs/observability.md, "UI"): the ledger
a Celery caller writes reads back through ``/api/runs``, a failed run's detail carries the
worker's traceback, ``/metrics`` counts what was made, and the cancel button of a run in
flight in the serving process revokes it on the worker."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import CeleryService
from hubs import hub_factory
from ui_runs import Client, hold, metric_values, state_of, until

from wove_adapters import ui
from wove_adapters.core.ledger import CANCELLED, FAILED, RUNNING, SUCCEEDED


def triple(x: int) -> int:
    return x * 3


def refuse(x: int) -> int:
    raise LookupError(f"no row {x}")


def test_the_runs_page_reads_and_cancels_celery_runs(
    redis_celery: CeleryService, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/runs.db"
    name = f"celery-ui-{uuid.uuid4().hex[:8]}"
    marker = str(tmp_path / "release")
    with hub_factory(name) as make:
        hub = make({"executor": "celery", "executor_config": redis_celery.executor_config},
                   ledger=url)
        made = [hub.submit(triple, i) for i in range(3)]
        assert [f.result(timeout=60) for f in made] == [0, 3, 6]
        failed = hub.submit(refuse, 7)
        with pytest.raises(LookupError):
            failed.result(timeout=60)
        held = hub.submit(hold, marker)
        server = ui.serve(hub=hub, listen="127.0.0.1:0", poll_seconds=0.2)
        try:
            until(lambda: state_of(url, held.run_id) == RUNNING, "the held run running")
            client = Client(server.url)
            runs = client.json("/api/runs", environment=name)["runs"]
            assert [r["run_id"] for r in runs] == [held.run_id, failed.run_id] + [
                f.run_id for f in reversed(made)]
            assert {r["executor"] for r in runs} == {"celery"}
            assert [r["state"] for r in runs] == [RUNNING, FAILED] + [SUCCEEDED] * 3
            detail = client.json(f"/api/runs/{failed.run_id}")
            assert "LookupError" in str(detail) and "no row 7" in str(detail)
            assert "refuse" in str(detail)  # the worker's traceback names the task's frame
            status, _, body = client.request("GET", "/metrics")
            assert status == 200, body
            values = metric_values(body.decode())
            assert values[(name, "celery", SUCCEEDED)] == 3
            assert values[(name, "celery", FAILED)] == 1
            assert values[(name, "celery", RUNNING)] == 1
            status, _, body = client.request("POST", f"/api/runs/{held.run_id}/cancel",
                                             {"Origin": client.origin})
            assert status == 202, body
            with pytest.raises(Exception, match="cancel"):
                held.result(timeout=60)
            until(lambda: state_of(url, held.run_id) == CANCELLED, "the held run cancelled")
            assert client.json(f"/api/runs/{held.run_id}")["state"] == CANCELLED
        finally:
            Path(marker).touch()
            server.close()
