"""Temporal specifics: worker helpers in a user's own worker and the module CLI, options
reaching Temporal, one execution per key through the workflow id, status mapping and
reconciliation for runs that die without an event, and cancellation recorded by Temporal
(the weave and the install hint are in the conformance suite)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from hubs import hub_factory
from services import pid_alive
from temporal_services import DevServer, WorkerProcess, start_worker

from wove_adapters.adapters.temporal import TemporalAdapter
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file

TIMEOUT = 60.0


@pytest.fixture
def hub_for(temporal_config: dict[str, Any]) -> Iterator[Callable[..., Hub]]:
    """``hub_for(executor_config=None, **settings)``: a Hub on the session's server and
    worker (``executor_config`` overrides), closed at teardown."""
    with hub_factory("t") as make:
        yield lambda executor_config=None, **settings: make({
            "executor": "temporal",
            "executor_config": {**temporal_config, **(executor_config or {})},
            **settings,
        })


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _client(address: str) -> Any:
    from temporalio.client import Client

    return await Client.connect(address)


async def _history_attributes(address: str, workflow_id: str) -> tuple[Any, Any]:
    """(the workflow's description, the scheduled activity's attributes)."""
    client = await _client(address)
    handle = client.get_workflow_handle(workflow_id)
    description = await handle.describe()
    history = await handle.fetch_history()
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            return description, event.activity_task_scheduled_event_attributes
    raise AssertionError(f"workflow {workflow_id} scheduled no activity")


def _wait_status(address: str, workflow_id: str, expected: str, timeout: float = 30) -> bool:
    async def status() -> str:
        client = await _client(address)
        description = await client.get_workflow_handle(workflow_id).describe()
        return str(description.status.name)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(status()) == expected:
            return True
        time.sleep(0.1)
    return False


def _wait_following(hub: Hub, timeout: float = TIMEOUT) -> None:
    """Until a run of ``hub`` follows another caller's workflow (its start found the
    workflow id taken and the transport follows that workflow)."""
    transport = hub.dispatcher().transport
    deadline = time.monotonic() + timeout
    while not (transport.followers is not None and transport.followers.runs):
        assert time.monotonic() < deadline, "the second caller never attached"
        time.sleep(0.02)


def _wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------- the worker side


def test_own_worker_hosts_our_workflow_next_to_its_own(
    temporal_server: DevServer, hub_for: Callable[..., Hub], tmp_path: Path
) -> None:
    """``workflows()`` + ``activities()`` in a user's own ``Worker``: our payloads and the
    user's own workflow are both served from one worker process."""
    queue = f"wove-test-temporal-own-{uuid.uuid4().hex[:8]}"
    worker = start_worker(temporal_server.address, queue, tmp_path / "own.log",
                          args=["--style", "own"])
    try:
        assert hub_for({"task_queue": queue}).run(tasks.add, 20, y=22) == 42

        async def greet() -> str:
            client = await _client(temporal_server.address)
            result: str = await client.execute_workflow(
                "user.Greet", "wove", id=f"greet-{uuid.uuid4().hex}", task_queue=queue
            )
            return result

        assert run(greet()) == "hello wove"
    finally:
        worker.stop()


def test_module_cli_worker_serves_payloads(
    temporal_server: DevServer, hub_for: Callable[..., Hub], tmp_path: Path
) -> None:
    """``python -m wove_adapters.adapters.temporal --task-queue Q`` is a complete worker."""
    queue = f"wove-test-temporal-cli-{uuid.uuid4().hex[:8]}"
    worker = start_worker(temporal_server.address, queue, tmp_path / "cli.log",
                          module="wove_adapters.adapters.temporal",
                          args=["--max-concurrent-activities", "2"])
    try:
        hub = hub_for({"task_queue": queue})
        try:
            assert hub.map(tasks.add, range(5)) == [1, 2, 3, 4, 5]
        finally:
            hub.close()  # before the worker stops: it must stop cleanly
    finally:
        worker.stop()
    assert worker.proc.returncode == 0, worker.log.read_text()[-2000:]


def test_doctor_reports_server_and_pollers(hub_for: Any) -> None:
    from wove_adapters.core import loop as shared_loop

    hub = hub_for()
    adapter = hub.dispatcher("t").transport.adapter
    rows = shared_loop.run_sync(adapter.doctor())
    assert rows and all(ok for _, ok, _ in rows), rows
    assert any("polls" in check for check, _, _ in rows)


# ---------------------------------------------------------------- submit options


def test_options_reach_temporal(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    key = f"opts-{uuid.uuid4().hex}"
    hub = hub_for(
        executor_config={"task_options": {
            "heartbeat_timeout": 7, "retries": 2, "priority": 2,
            "memo": {"team": "reports"}, "start_to_close_timeout": 600,
        }},
        delivery_idempotency_key=key,
    )
    assert hub.run(tasks.record, str(markers), "opts", 4) == 8
    description, scheduled = run(
        _history_attributes(temporal_server.address, f"wove-key-{key}")
    )
    assert scheduled.heartbeat_timeout.ToTimedelta().total_seconds() == 7
    assert scheduled.start_to_close_timeout.ToTimedelta().total_seconds() == 600
    assert scheduled.retry_policy.maximum_attempts == 3
    assert run(description.memo_value("team")) == "reports"
    assert description.raw_description.workflow_execution_info.priority.priority_key == 2


def test_default_activity_retry_is_one_attempt(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    """Our orphan policy owns requeue: Temporal does not retry the activity by itself."""
    key = f"retry-{uuid.uuid4().hex}"
    hub = hub_for(delivery_idempotency_key=key)
    assert hub.run(tasks.record, str(markers), "retry", 1) == 2
    _, scheduled = run(_history_attributes(temporal_server.address, f"wove-key-{key}"))
    assert scheduled.retry_policy.maximum_attempts == 1
    assert scheduled.heartbeat_timeout.ToTimedelta().total_seconds() == 10


def test_payload_between_inline_limit_and_blob_limit_goes_through_the_store(
    hub_for: Any, temporal_server: DevServer
) -> None:
    """1.8 MiB: over our 1 MiB inline limit, under Temporal's 2 MiB blob limit only as a
    store reference (inline, the base64 payload would be ~2.4 MiB and refused)."""
    key = f"big-{uuid.uuid4().hex}"
    data = os.urandom(1_800_000)
    hub = hub_for(delivery_idempotency_key=key)
    assert hub.run(tasks.digest, data) == tasks.digest(data)

    async def input_size() -> int:
        client = await _client(temporal_server.address)
        history = await client.get_workflow_handle(f"wove-key-{key}").fetch_history()
        started = history.events[0].workflow_execution_started_event_attributes
        return sum(len(p.data) for p in started.input.payloads)

    assert run(input_size()) < 64 * 1024


# ---------------------------------------------------------------- idempotency


def test_one_execution_per_key_across_callers_without_a_shared_ledger(
    hub_for: Any, markers: Path
) -> None:
    """Two callers whose ledgers know nothing of each other (say, two hosts): the workflow
    id is the key, so the second start attaches to the first run and both get its result;
    a caller arriving after it completed gets the recorded result, not a new execution."""
    key = f"cross-{uuid.uuid4().hex}"
    first = hub_for(delivery_idempotency_key=key, ledger=f"memory://a-{key}")
    second = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    one = first.submit(tasks.record, str(markers), "cross", 5)
    two = second.submit(tasks.record, str(markers), "cross", 5)
    assert one.result(timeout=TIMEOUT) == 10
    assert two.result(timeout=TIMEOUT) == 10
    later = hub_for(delivery_idempotency_key=key, ledger=f"memory://c-{key}")
    assert later.run(tasks.record, str(markers), "cross", 5) == 10
    runs = (markers / "cross.runs").read_text().splitlines()
    assert len(runs) == 1, f"one key ran {len(runs)} times"


def test_a_key_whose_task_raised_may_run_again(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    """A task that raised fails its workflow, which releases the workflow id (as the
    ledger releases a failed key): the next caller with that key runs the task again."""
    key = f"again-{uuid.uuid4().hex}"
    first = hub_for(delivery_idempotency_key=key, ledger=f"memory://a-{key}")
    with pytest.raises(tasks.ConformanceError, match="first try"):
        first.run(tasks.fail, "first try")
    # The caller hears first (callback); the workflow closes a moment later. Until then
    # a second caller would attach to it (and get the same error).
    assert _wait_status(temporal_server.address, f"wove-key-{key}", "FAILED")
    second = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    assert second.run(tasks.record, str(markers), "again", 3) == 6
    assert len((markers / "again.runs").read_text().splitlines()) == 1


def test_an_attached_caller_gets_the_original_error(hub_for: Any, markers: Path) -> None:
    """The second caller attaches to the running execution; its task raises; both callers
    get the original exception (the follower reads it from the workflow's failure)."""

    def slow_failure(directory: str) -> None:  # defined here: travels by value
        Path(directory, "slow-failure.started").write_text(str(os.getpid()))
        time.sleep(1.5)
        raise KeyError("late failure")

    key = f"err-{uuid.uuid4().hex}"
    first = hub_for(delivery_idempotency_key=key, ledger=f"memory://a-{key}")
    second = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    one = first.submit(slow_failure, str(markers))
    wait_for_file(markers / "slow-failure.started", TIMEOUT)
    two = second.submit(slow_failure, str(markers))
    for future in (one, two):
        with pytest.raises(KeyError, match="late failure"):
            future.result(timeout=TIMEOUT)


def test_cancelling_an_attached_caller_leaves_the_owners_workflow_running(
    hub_for: Any, markers: Path
) -> None:
    """The attached caller's cancel ends only its own run, at once; the workflow is the
    first caller's and finishes for it."""
    key = f"leave-{uuid.uuid4().hex}"
    first = hub_for(delivery_idempotency_key=key, ledger=f"memory://a-{key}")
    second = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    one = first.submit(tasks.sleepy, str(markers), "leave", 4.0)
    wait_for_file(markers / "leave.started", TIMEOUT)
    two = second.submit(tasks.sleepy, str(markers), "leave", 4.0)
    _wait_following(second)
    second.cancel(two)
    with pytest.raises(CancelledErrors):
        two.result(timeout=TIMEOUT)
    assert not (markers / "leave.finished").exists()
    assert one.result(timeout=TIMEOUT) == "leave"


def test_attached_callers_are_cancelled_with_the_workflow_they_follow(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    """The owner cancels: the workflow ends CANCELED, and a caller attached to it is
    cancelled too (status_many reports it CANCELLED to the transport's follower)."""
    key = f"with-{uuid.uuid4().hex}"
    first = hub_for(delivery_idempotency_key=key, ledger=f"memory://a-{key}")
    second = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    one = first.submit(tasks.sleepy, str(markers), "with", 60.0)
    pid = int(wait_for_file(markers / "with.started", TIMEOUT))
    two = second.submit(tasks.sleepy, str(markers), "with", 60.0)
    _wait_following(second)
    first.cancel(one)
    for future in (one, two):
        with pytest.raises(CancelledErrors):
            future.result(timeout=TIMEOUT)
    assert _wait_status(temporal_server.address, f"wove-key-{key}", "CANCELED")
    assert _wait_gone(pid), "the cancelled task kept running"


# ---------------------------------------------------------------- status and reconciliation


def test_state_map_covers_every_workflow_status() -> None:
    from temporalio.client import WorkflowExecutionStatus

    expected = {
        "RUNNING": JobState.RUNNING, "COMPLETED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED, "CANCELED": JobState.CANCELLED,
        "TERMINATED": JobState.CANCELLED, "TIMED_OUT": JobState.FAILED,
        "CONTINUED_AS_NEW": JobState.RUNNING,
    }
    assert {s.name: TemporalAdapter.map_state(s.name) for s in WorkflowExecutionStatus} == expected
    assert TemporalAdapter.map_state("SOMETHING_NEW") is JobState.UNKNOWN
    assert TemporalAdapter.map_state(None) is JobState.UNKNOWN


def test_terminated_workflow_is_a_lost_run(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    """An operator terminates the workflow: no event ever comes; status() says
    TERMINATED, reconciliation calls the run lost and its orphan policy applies. A caller
    attached to it (another ledger, the same key) is cancelled."""
    key = f"term-{uuid.uuid4().hex}"
    hub = hub_for(delivery_idempotency_key=key, delivery_orphan_policy="fail",
                  ledger=f"memory://a-{key}")
    attached = hub_for(delivery_idempotency_key=key, ledger=f"memory://b-{key}")
    future = hub.submit(tasks.sleepy, str(markers), "term", 60.0)
    pid = int(wait_for_file(markers / "term.started", TIMEOUT))
    follower = attached.submit(tasks.sleepy, str(markers), "term", 60.0)
    _wait_following(attached)

    async def terminate() -> None:
        client = await _client(temporal_server.address)
        await client.get_workflow_handle(f"wove-key-{key}").terminate("test: operator")

    run(terminate())
    with pytest.raises(DeliveryOrphanedError, match="cancelled without a terminal event"):
        future.result(timeout=TIMEOUT)
    with pytest.raises(CancelledErrors):
        follower.result(timeout=TIMEOUT)
    # Temporal tells the activity on its next heartbeat; the task process is killed.
    assert _wait_gone(pid), "the task of a terminated workflow kept running"
    assert not (markers / "term.finished").exists()


def test_whole_worker_killed_mid_task(
    temporal_server: DevServer, markers: Path, tmp_path: Path
) -> None:
    """SIGKILL the worker process itself: its task process dies with it; the activity's
    heartbeat timeout lets Temporal fail the workflow once a worker is back; the run is
    lost and the orphan policy applies (no delivery heartbeats configured here)."""
    queue = f"wove-test-temporal-kill-{uuid.uuid4().hex[:8]}"
    worker = start_worker(temporal_server.address, queue, tmp_path / "kill.log")
    replacement: WorkerProcess | None = None
    hub = Hub(environments={"k": {
        "executor": "temporal",
        "executor_config": {"address": temporal_server.address, "task_queue": queue,
                            "heartbeat_timeout": 2},
        "delivery_orphan_policy": "fail",
    }}, default_environment="k")
    try:
        future = hub.submit(tasks.sleepy, str(markers), "whole", 60.0)
        pid = int(wait_for_file(markers / "whole.started", TIMEOUT))
        worker.kill()
        assert _wait_gone(pid), "the task process outlived its killed worker"
        replacement = start_worker(temporal_server.address, queue, tmp_path / "kill2.log")
        with pytest.raises(DeliveryOrphanedError, match="failed without a terminal event"):
            future.result(timeout=TIMEOUT)
    finally:
        hub.close()
        worker.stop()
        if replacement is not None:
            replacement.stop()


def test_require_ack_waits_until_temporal_records_the_cancel(
    hub_for: Any, temporal_server: DevServer, markers: Path
) -> None:
    key = f"ack-{uuid.uuid4().hex}"
    hub = hub_for(delivery_idempotency_key=key, delivery_cancel_mode="require_ack")
    future = hub.submit(tasks.sleepy, str(markers), "ack", 60.0)
    pid = int(wait_for_file(markers / "ack.started", TIMEOUT))
    hub.cancel(future, mode="require_ack")
    with pytest.raises(CancelledErrors):
        future.result(timeout=TIMEOUT)
    assert _wait_gone(pid, 15), "acknowledged, yet the task process still runs"

    assert _wait_status(temporal_server.address, f"wove-key-{key}", "CANCELED", 15)


# ---------------------------------------------------------------- wove, install hint


def test_unreachable_server_fails_with_a_hint() -> None:
    from temporal_services import free_port

    hub = Hub(environments={"down": {"executor": "temporal", "executor_config": {
        "address": f"127.0.0.1:{free_port()}", "connect_timeout": 5}}},
        default_environment="down")
    try:
        with pytest.raises(ConnectionError, match="temporal server start-dev"):
            hub.run(tasks.add, 1)
    finally:
        hub.close()
