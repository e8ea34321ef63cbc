"""Which Celery states the payload task writes for an unkeyed run (``execute``): only
those someone may read. Real worker, real Redis result backend, read back raw."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import CeleryService, wait_state

from wove_adapters.core import loop as shared_loop
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


def _hub(service: CeleryService, **config: Any) -> Hub:
    environment = {"executor": "celery",
                   "executor_config": {**service.executor_config, **config}}
    return Hub(environments={"c": environment}, default_environment="c")


def _meta(app: Any, task_id: str) -> bytes | None:
    """The raw meta the worker wrote, None if it wrote nothing."""
    value: bytes | None = app.backend.get(app.backend.get_key_for_task(task_id))
    return value


def test_a_short_delivered_run_writes_no_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker of its own, whose tasks wait up to 10 s for the caller's answer (instead
    of ``WOVE_ADAPTERS_ACK_GRACE``'s 20 ms): every answer then comes in time however
    loaded the machine, and none may leave a state behind."""
    monkeypatch.setenv("WOVE_ADAPTERS_ACK_GRACE", "10")
    service = CeleryService("redis", log_dir=tmp_path)
    service.start()
    monkeypatch.delenv("WOVE_ADAPTERS_ACK_GRACE")
    app = service.client_app()
    try:
        with _hub(service) as hub:
            futures = [hub.submit(tasks.add, i) for i in range(20)]
            assert [f.result(timeout=60) for f in futures] == [i + 1 for i in range(20)]
        # A state is written within milliseconds of a task's end (the next tests wait
        # for theirs): half a second is ample for one to show up.
        time.sleep(0.5)
        written = [f.run_id for f in futures if _meta(app, f"{f.run_id}.1")]
        assert written == [], f"state written for delivered short runs: {written}"
    finally:
        app.close()
        service.stop()
        service.cleanup()


def test_a_long_run_writes_started_then_success(
    redis_celery: CeleryService, markers: Path
) -> None:
    app = redis_celery.client_app()
    try:
        with _hub(redis_celery) as hub:
            future = hub.submit(tasks.sleepy, str(markers), "long", 1.5)
            wait_for_file(markers / "long.started", 60)
            task_id = f"{future.run_id}.1"
            wait_state(app, task_id, "STARTED")  # what tells a lost worker from a slow one
            assert app.AsyncResult(task_id).result["hostname"] == redis_celery.node
            assert future.result(timeout=60) == "long"
            wait_state(app, task_id, "SUCCESS")  # STARTED is never the last word
            assert app.AsyncResult(task_id).result["state"] == "succeeded"
    finally:
        app.close()


def test_a_short_run_whose_caller_answers_late_writes_success(
    redis_celery: CeleryService,
) -> None:
    """The caller's loop (its receiver) is blocked when the task ends: the worker's
    first try gets no answer within the grace, so SUCCESS records that the job finished
    (reconciliation must not call it lost meanwhile), with the signed outcome, before the
    slot is freed; the outbox reads the answer once the loop turns again."""
    app = redis_celery.client_app()
    try:
        # countdown: the worker holds the message and runs the task 1.5 s after sending.
        with _hub(redis_celery, send_options={"countdown": 1.5}) as hub:
            future = hub.submit(tasks.add, 41)
            dispatcher = hub.dispatcher("c")
            deadline = time.monotonic() + 30
            while not dispatcher.runs[future.run_id].launched:  # sent to the broker
                assert time.monotonic() < deadline
                time.sleep(0.01)
            task_id = f"{future.run_id}.1"
            assert _meta(app, task_id) is None
            shared_loop.get_loop().call_soon_threadsafe(time.sleep, 5.0)
            wait_state(app, task_id, "SUCCESS", timeout=4.5)  # while the loop is blocked
            stored = app.AsyncResult(task_id).result
            assert stored["run_id"] == future.run_id and stored["outcome"], stored
            assert future.result(timeout=60) == 42  # the outbox delivers it afterwards
    finally:
        app.close()
