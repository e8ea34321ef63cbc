"""Celery-specific behaviour, against real brokers and real ``celery worker`` processes."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import REDIS_URL, CeleryService, wait_state
from lazy_imports import assert_imports_without

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


def _hub(service: CeleryService, *, ledger: str | None = None, **settings: Any) -> Hub:
    config = dict(settings.pop("executor_config", None) or service.executor_config)
    environment = {"executor": "celery", "executor_config": config, **settings}
    extra = {"ledger": ledger} if ledger else {}
    return Hub(environments={"c": environment}, default_environment="c", **extra)


def _adapter(config: dict[str, Any]) -> Any:
    from wove_adapters.adapters.celery import CeleryAdapter

    adapter = CeleryAdapter({**config, "_key_id": "unused"}, environment="t")
    shared_loop.run_sync(adapter.start())
    return adapter


# ---------------------------------------------------------------- the worker side


def test_module_import_does_not_import_celery() -> None:
    assert_imports_without("wove_adapters.adapters.celery", ["celery", "kombu"],
                           "assert callable(m.register) and m.TASK_NAME == 'wove_adapters.run'")


def test_register_adds_the_task_to_a_users_app() -> None:
    from celery import Celery

    from wove_adapters.adapters.celery import register

    app = Celery("someone-elses-app", set_as_current=False)
    register(app, acks_late=True, reject_on_worker_lost=True)
    task = app.tasks["wove_adapters.run"]
    assert task.acks_late and task.reject_on_worker_lost
    # States are written by the task itself (one round trip each); failures Celery sees
    # on its own (worker lost, revoked) are still stored.
    assert task.ignore_result and task.store_errors_even_if_ignored
    register(app)  # idempotent: the first registration stays
    assert app.tasks["wove_adapters.run"] is task and task.acks_late


def test_worker_app_entrypoint_with_celerys_own_cli(tmp_path: Path) -> None:
    """``celery -A wove_adapters.adapters.celery:worker_app worker``: no app of your own."""
    service = CeleryService("redis", log_dir=tmp_path)
    service.start(app_module="wove_adapters.adapters.celery:worker_app")
    try:
        with _hub(service) as hub:
            assert hub.run(tasks.add, 41) == 42
    finally:
        service.stop()
        service.cleanup()


def test_user_app_worker_runs_payloads(redis_celery: CeleryService) -> None:
    """The session worker is ``celery -A celery_test_app worker`` (a user's app with
    ``register(app)``); its own plain tasks keep working beside ours."""
    app = redis_celery.client_app()
    try:
        assert app.send_task("wove_test.add", args=[1, 2],
                             queue=redis_celery.queue).get(timeout=30) == 3
    finally:
        app.close()
    with _hub(redis_celery) as hub:
        assert hub.map(tasks.add, range(5)) == [1, 2, 3, 4, 5]


# ---------------------------------------------------------------- options, ids, status


def test_send_task_options_pass_through(redis_celery: CeleryService, markers: Path) -> None:
    """Queue, priority, headers and expiry from executor_config/task_options reach the
    broker message; the message is read back raw from Redis."""
    import redis

    parked = f"{redis_celery.queue}-parked"
    config = {
        **redis_celery.executor_config,
        "send_options": {"headers": {"x-wove-test": "yes"}},
        "task_options": {"queue": parked, "priority": 3, "expires": 600},
    }
    client = redis.Redis.from_url(REDIS_URL)
    with _hub(redis_celery, executor_config=config) as hub:
        future = hub.submit(tasks.add, 1)
        deadline = time.monotonic() + 30
        raw: list[bytes] = []
        while not raw and time.monotonic() < deadline:
            for key in client.scan_iter(match=f"{redis_celery.prefix}{parked}*"):
                if client.type(key) == b"list":
                    raw = client.lrange(key, 0, -1)
            time.sleep(0.05)
        hub.cancel(future)
    client.close()
    assert raw, "no message in the parked queue"
    message = json.loads(raw[0])
    headers, properties = message["headers"], message["properties"]
    assert headers["task"] == "wove_adapters.run"
    assert headers["id"] == f"{future.run_id}.1"
    assert headers["x-wove-test"] == "yes"
    assert headers["expires"] is not None
    assert properties["priority"] == 3
    assert properties["delivery_info"]["routing_key"] == parked


def test_idempotency_key_is_the_celery_task_id(redis_celery: CeleryService, markers: Path) -> None:
    key = f"order/{uuid.uuid4().hex[:8]} #1"
    with _hub(redis_celery, delivery_idempotency_key=key) as hub:
        assert hub.run(tasks.record, str(markers), "key", 5) == 10
    from wove_adapters.adapters.base import BackendAdapter

    task_id = BackendAdapter.safe_name(key, allowed=r"A-Za-z0-9_\-.:@", max_len=200)
    assert task_id.startswith("order-")
    app = redis_celery.client_app()
    try:
        wait_state(app, task_id, "SUCCESS")  # stored just after the event went out
        result = app.AsyncResult(task_id)
        assert result.result["state"] == "succeeded" and result.result["outcome"]
    finally:
        app.close()


def test_same_key_one_execution_across_callers_without_a_shared_ledger(
    redis_celery: CeleryService, markers: Path, tmp_path: Path
) -> None:
    """Two callers with separate ledgers: the Redis claim makes one Celery task, both get
    its result, and a third caller later gets the recorded result without a new run."""
    key = f"shared-{uuid.uuid4().hex}"
    hubs = [
        _hub(redis_celery, ledger=f"sqlite:///{tmp_path}/ledger{i}.db",
             delivery_idempotency_key=key)
        for i in range(3)
    ]
    try:
        first = hubs[0].submit(tasks.record, str(markers), "shared", 21)
        second = hubs[1].submit(tasks.record, str(markers), "shared", 21)
        assert first.result(timeout=60) == 42
        assert second.result(timeout=60) == 42
        assert len((markers / "shared.runs").read_text().splitlines()) == 1
        app = redis_celery.client_app()
        try:  # the claim lives beside the task's result, under the name older callers use
            claim = app.backend.client.get(app.backend.get_key_for_task(key, key=":wove-claim"))
        finally:
            app.close()
        assert claim is not None and json.loads(claim)["handle"] == key
        assert hubs[2].run(tasks.record, str(markers), "shared", 21) == 42
        assert len((markers / "shared.runs").read_text().splitlines()) == 1
        # A recorded failure comes back with its type to a later caller too.
        failing = f"fails-{uuid.uuid4().hex}"
        with pytest.raises(tasks.ConformanceError, match="once"):
            hubs[0].run(tasks.fail, "once", task_options={"delivery_idempotency_key": failing})
        with pytest.raises(tasks.ConformanceError, match="once"):
            hubs[2].run(tasks.fail, "once", task_options={"delivery_idempotency_key": failing})
    finally:
        for hub in hubs:
            hub.close()


def test_state_map_covers_celery_states() -> None:
    from celery import states

    from wove_adapters.adapters.celery import CeleryAdapter

    for state in states.ALL_STATES:
        assert CeleryAdapter.map_state(state) is not JobState.UNKNOWN, state
    assert CeleryAdapter.map_state("PENDING") is JobState.PENDING
    assert CeleryAdapter.map_state("STARTED") is JobState.RUNNING
    assert CeleryAdapter.map_state("REVOKED") is JobState.CANCELLED
    assert CeleryAdapter.map_state("SOMETHING-NEW") is JobState.UNKNOWN


def test_status_of_unknown_running_and_finished_tasks(
    redis_celery: CeleryService, markers: Path
) -> None:
    adapter = _adapter(redis_celery.executor_config)
    try:
        # PENDING is Celery's answer for "never heard of it" too.
        assert shared_loop.run_sync(adapter.status("no-such-task")) is JobState.PENDING
        running = f"run-{uuid.uuid4().hex}"
        with _hub(redis_celery, delivery_idempotency_key=running) as hub:
            future = hub.submit(tasks.sleepy, str(markers), "status", 1.5)
            wait_for_file(markers / "status.started", 60)
            deadline = time.monotonic() + 10  # STARTED is written beside the task
            while (state := shared_loop.run_sync(adapter.status(running))) is JobState.PENDING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert state is JobState.RUNNING
            assert future.result(timeout=60) == "status"
        key = f"st-{uuid.uuid4().hex}"
        with _hub(redis_celery, delivery_idempotency_key=key) as hub:
            assert hub.run(tasks.add, 1) == 2
        # Celery stores SUCCESS just after the task body returns (the event came first).
        deadline = time.monotonic() + 30
        while (state := shared_loop.run_sync(adapter.status(key))) is not JobState.SUCCEEDED:
            # STARTED and SUCCESS are written off the task's path: either may lag the event.
            assert state in (JobState.PENDING, JobState.RUNNING), state
            assert time.monotonic() < deadline, state
            time.sleep(0.02)
    finally:
        shared_loop.run_sync(adapter.aclose())


def test_job_killed_without_an_event_is_found_by_reconciliation(
    redis_celery: CeleryService, markers: Path
) -> None:
    """No heartbeats: only the result backend (WorkerLostError -> FAILURE) can tell."""
    with _hub(redis_celery, delivery_orphan_policy="fail") as hub:
        future = hub.submit(tasks.die_once, str(markers), "silent")
        os.kill(int(wait_for_file(markers / "silent.pid", 60)), 9)
        with pytest.raises(DeliveryOrphanedError, match="backend reports the job failed"):
            future.result(timeout=60)


def test_cancel_interrupts_the_task_inside_the_prefork_child(
    amqp_celery: CeleryService, markers: Path
) -> None:
    """revoke(terminate) SIGTERMs the child; our entrypoint turns it into task_cancelled,
    the child survives (same pid runs the next task) and Celery records REVOKED."""
    key = f"cancel-{uuid.uuid4().hex}"
    with _hub(amqp_celery, delivery_cancel_mode="require_ack") as hub:
        future = hub.submit(tasks.sleepy, str(markers), "child", 30.0,
                            task_options={"delivery_idempotency_key": key})
        pid = int(wait_for_file(markers / "child.started", 60))
        hub.cancel(future)
        assert future.cancelled() or future.done()
        app = amqp_celery.client_app()
        try:
            wait_state(app, key, "REVOKED")
        finally:
            app.close()
        assert hub.run(os.getpid) == pid, "the prefork child died instead of cancelling"
    time.sleep(1.0)
    assert not (markers / "child.finished").exists()


# ---------------------------------------------------------------- the redis return path


@pytest.mark.parametrize("broker", ["redis", "amqp"])
def test_redis_return_path_end_to_end(
    broker: str, redis_celery: CeleryService, amqp_celery: CeleryService, markers: Path
) -> None:
    """Workers push signed events to a Redis list the caller reads: no HTTP receiver."""
    from wove_adapters.callbacks.dropbox import DropboxReader

    service = redis_celery if broker == "redis" else amqp_celery
    config = {**service.executor_config, "return_path": "redis", "return_redis_url": REDIS_URL}
    with _hub(service, executor_config=config) as hub:
        assert isinstance(hub.dispatcher("c").transport.receiver, DropboxReader)
        assert hub.run(tasks.add, 1, y=2) == 3
        assert hub.map(tasks.add, range(10)) == [i + 1 for i in range(10)]
        with pytest.raises(tasks.ConformanceError):
            hub.run(tasks.fail, "by drop box")
        future = hub.submit(tasks.sleepy, str(markers), "dropbox", 30.0)
        wait_for_file(markers / "dropbox.started", 60)
        hub.cancel(future)
        time.sleep(1.0)
        assert not (markers / "dropbox.finished").exists()


# ---------------------------------------------------------------- wove


# ---------------------------------------------------------------- doctor, errors


def test_doctor_rows(redis_celery: CeleryService) -> None:
    adapter = _adapter({**redis_celery.executor_config, "inspect_timeout": 1.0})
    try:
        rows = {check: (ok, detail) for check, ok, detail in shared_loop.run_sync(adapter.doctor())}
    finally:
        shared_loop.run_sync(adapter.aclose())
    assert rows["broker reachable"][0] and rows["result backend"][0]
    assert rows["worker on queue"] == (True, rows["worker on queue"][1])
    assert redis_celery.node in rows["worker on queue"][1]

    lonely = _adapter({**redis_celery.executor_config, "queue": "nobody-listens",
                       "inspect_timeout": 1.0})
    try:
        rows = {check: (ok, detail) for check, ok, detail in shared_loop.run_sync(lonely.doctor())}
    finally:
        shared_loop.run_sync(lonely.aclose())
    ok, detail = rows["worker on queue"]
    assert not ok and "no worker consumes queue 'nobody-listens'" in detail
    assert "register(app)" in detail


def test_unreachable_broker_is_a_clear_start_error() -> None:
    with Hub(environments={"c": {"executor": "celery", "executor_config": {
        "broker_url": "redis://127.0.0.1:1/0", "connect_timeout": 1}}},
        default_environment="c",
    ) as hub, pytest.raises(ConnectionError, match="unreachable.*broker_url"):
        hub.run(tasks.add, 1)
