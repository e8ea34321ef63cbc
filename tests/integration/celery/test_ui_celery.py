"""The runs page over a real Celery worker's runs (docs/observability.md, "UI"): the ledger
a Celery caller writes reads back through ``/api/runs``, a failed run's detail carries the
worker's traceback, ``/metrics`` counts what was made, the cancel button of a run in
flight in the serving process revokes it on the worker, and a page that knows only the
configuration revokes the job of a run another process submitted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import CeleryService
from hubs import hub_factory
from ui_runs import Client, hold, metric_values, state_of, until

from wove_adapters import ui
from wove_adapters.core.config import load_config
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


# A caller in another process: it submits ``finish_late`` (which writes ``path`` only if
# it runs to its end), prints the run id, and reports how its own future ended.
_CALLER = """
import json, sys, time
from pathlib import Path
from wove_adapters import Hub

def finish_late(path, seconds):
    time.sleep(seconds)
    Path(path).write_text("finished")
    return path

name, definition, ledger, path, seconds = json.loads(sys.argv[1])
hub = Hub(environments={name: definition}, default_environment=name, ledger=ledger)
future = hub.submit(finish_late, path, seconds)
print(future.run_id, flush=True)
try:
    future.result(timeout=120)
    print("finished", flush=True)
except Exception as exc:
    print(f"ended: {type(exc).__name__}: {exc}", flush=True)
hub.close()
"""


def test_a_page_elsewhere_cancels_a_celery_run_that_owns_its_job(
    redis_celery: CeleryService, tmp_path: Path
) -> None:
    """The page knows only the configuration (no Hub, no dispatcher): the run is not in
    flight in its process, yet its Celery job is its own, so the page revokes it."""
    url = f"sqlite:///{tmp_path}/runs.db"
    name = f"celery-far-{uuid.uuid4().hex[:8]}"
    definition = {"executor": "celery", "executor_config": redis_celery.executor_config}
    end_file = tmp_path / "finished"
    seconds = 8.0
    env = {k: v for k, v in os.environ.items() if not k.startswith("WOVE__")}
    caller = subprocess.Popen(
        [sys.executable, "-c", _CALLER,
         json.dumps([name, definition, url, str(end_file), seconds])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    config = load_config({"environments": {name: definition}}, cwd=tmp_path)
    server = ui.serve(config=config, ledger=url, listen="127.0.0.1:0", poll_seconds=0.2)
    try:
        assert caller.stdout is not None
        run_id = caller.stdout.readline().strip()
        assert run_id, caller.stderr.read() if caller.stderr else ""
        until(lambda: state_of(url, run_id) == RUNNING, "the run running on the worker")
        finish_by = time.time() + seconds  # it started on the worker before this
        client = Client(server.url)
        row = client.json(f"/api/runs/{run_id}")
        assert row["cancellable"] is True, row["cancel_note"]
        assert row["executor"] == "celery" and row["submission"]
        status, _, body = client.request("POST", f"/api/runs/{run_id}/cancel",
                                         {"Origin": client.origin})
        assert status == 202, body
        assert json.loads(body)["job"] == row["submission"]
        # The caller learns it on its own path (the worker's event or reconciliation).
        told = caller.stdout.readline()
        assert told.startswith("ended:") and "ancel" in told, told
        assert caller.wait(timeout=60) == 0
        until(lambda: state_of(url, run_id) == CANCELLED, "the run cancelled")
        assert client.json(f"/api/runs/{run_id}")["cancel_note"] == "the run has ended (cancelled)"
        # The job stopped on the worker: past the time it would have taken, no file.
        time.sleep(max(0.0, finish_by + 3.0 - time.time()))
        assert not end_file.exists()
    finally:
        server.close()
        if caller.poll() is None:
            caller.kill()
            caller.wait()
