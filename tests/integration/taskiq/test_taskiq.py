"""Taskiq-specific behaviour against the real ``taskiq worker`` CLI and Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskiq_fixtures import REDIS_URL, TaskiqWorker, redis_client

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from hubs import hub_factory, mapped_handles
from services import pid_alive


@pytest.fixture
def hubs() -> Iterator[Callable[..., Hub]]:
    """``hubs(executor_config, **settings)``: a Hub on taskiq, closed at teardown."""
    with hub_factory("t") as make:
        yield lambda config, **settings: make(
            {"executor": "taskiq", "executor_config": config, **settings})


def _wait_for_message(client: Any, queue: str) -> None:
    """Until the message the caller sent is on ``queue`` (no worker reads it), 30 s at most."""
    deadline = time.monotonic() + 30
    while not client.llen(queue) and time.monotonic() < deadline:
        time.sleep(0.02)


def _submission(hub: Hub, run_id: str) -> str:
    dispatcher = hub.dispatcher("t")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        run = dispatcher.runs.get(run_id)
        if run is not None and run.attempt.submission:
            return run.attempt.submission
        time.sleep(0.01)
    raise AssertionError(f"run {run_id} was never submitted")


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _worker_of(pid: int) -> int:
    """The taskiq worker process a payload process runs under (worker -> zygote -> it)."""
    return _parent_of(_parent_of(pid))


# ---------------------------------------------------------------- the system's own CLI


def test_cli_worker_runs_payloads_and_doctor_sees_it(
    taskiq_worker: TaskiqWorker, hubs: Any
) -> None:
    hub = hubs(taskiq_worker.config)
    assert hub.run(tasks.add, 2, y=3) == 5
    adapter = hub.dispatcher("t").transport.adapter
    rows = shared_loop.run_sync(adapter.doctor())
    assert [ok for _, ok, _ in rows] == [True, True, True], rows
    assert taskiq_worker.queue in rows[1][2]


def test_doctor_names_what_is_missing(redis_available: None, hubs: Any) -> None:
    idle = f"wove-test-taskiq-nobody-{uuid.uuid4().hex[:6]}"
    hub = hubs({"url": REDIS_URL, "queue": idle})
    rows = shared_loop.run_sync(hub.dispatcher("t").transport.adapter.doctor())
    _, ok, detail = rows[1]
    assert not ok and "register(broker)" in detail and "taskiq worker" in detail


def test_unreachable_redis_is_a_clear_start_up_error(hubs: Any) -> None:
    hub = hubs({"url": "redis://127.0.0.1:1/0", "queue": "nowhere"})
    with pytest.raises(ConnectionError, match="redis-server"):
        hub.run(tasks.add, 1)


def test_idle_worker_survives_redis_py_8_read_timeout(taskiq_worker: TaskiqWorker) -> None:
    """redis-py 8 times out reads after 5 s; an idle ListQueueBroker worker must not die."""
    before = taskiq_worker.worker_pids()
    time.sleep(6.5)
    assert taskiq_worker.worker_pids() == before


def test_register_lifts_the_brpop_read_timeout() -> None:
    from taskiq_redis import ListQueueBroker

    from wove_adapters.adapters.taskiq import TASK_NAME, register

    broker = ListQueueBroker(REDIS_URL, queue_name="wove-test-unused")
    assert "socket_timeout" not in broker.connection_pool.connection_kwargs  # redis-py: 5 s
    task = register(broker)
    assert broker.connection_pool.connection_kwargs["socket_timeout"] is None
    assert task.task_name == TASK_NAME and TASK_NAME in broker.get_all_tasks()


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("removed", ["status_cache", "follow_poll"])
def test_removed_options_are_refused_at_start_up(
    redis_available: None, hubs: Any, removed: str
) -> None:
    """The transport follows keyed jobs and reconciliation asks about all runs at once:
    these options are gone, and a config that still sets one fails like any typo."""
    from wove_adapters.core.errors import ExecutorConfigError

    hub = hubs({"url": REDIS_URL, "queue": "wove-test-taskiq-unused", removed: 0.25})
    with pytest.raises(ExecutorConfigError, match=removed):
        hub.run(tasks.add, 1)


def test_labels_and_queue_routing_pass_through(taskiq_worker: TaskiqWorker, hubs: Any) -> None:
    side = f"wove-test-taskiq-side-{uuid.uuid4().hex[:6]}"
    config = {
        **taskiq_worker.config,
        "labels": {"team": "data"},
        "task_options": {"queue_name": side, "priority": 3},
    }
    hub = hubs(config)
    client = redis_client()
    try:
        future = hub.submit(tasks.add, 1)
        _wait_for_message(client, side)
        message = json.loads(client.lindex(side, 0))
        assert message["task_name"] == "wove_adapters.run"
        assert message["labels"]["team"] == "data"
        assert message["labels"]["priority"] == "3"  # taskiq sends labels as text + a type tag
        assert "priority" in message["labels_types"]
        assert message["labels"]["queue_name"] == side
        assert message["task_id"] == _submission(hub, future.run_id)  # type: ignore[attr-defined]
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=30)
    finally:
        client.delete(side)


def test_redis_drop_box_return_path(taskiq_worker: TaskiqWorker, hubs: Any) -> None:
    """Workers that cannot reach the caller push signed events to a Redis list."""
    from wove_adapters.callbacks.dropbox import DropboxReader

    config = {**taskiq_worker.config, "return_path": "redis", "return_redis_url": REDIS_URL}
    hub = hubs(config)
    assert isinstance(hub.dispatcher("t").transport.receiver, DropboxReader)
    assert hub.map(tasks.add, range(10)) == [i + 1 for i in range(10)]
    with pytest.raises(tasks.ConformanceError, match="via redis"):
        hub.run(tasks.fail, "via redis")


# ---------------------------------------------------------------- idempotency


def test_idempotency_key_is_the_taskiq_task_id_across_ledgers(
    taskiq_worker: TaskiqWorker, hubs: Any, markers: Path
) -> None:
    """Callers that do not share a ledger still get one execution: the Redis claim on the
    sanitised key (= the taskiq task id) makes the second caller follow the first job."""
    key = f"order {uuid.uuid4().hex[:8]}:v1"  # spaces and colons: sanitised
    one = hubs(taskiq_worker.config, ledger="memory://taskiq-one", delivery_idempotency_key=key)
    two = hubs(taskiq_worker.config, ledger="memory://taskiq-two", delivery_idempotency_key=key)
    first = one.submit(tasks.record, str(markers), "cross", 21)
    handle = _submission(one, first.run_id)  # type: ignore[attr-defined]
    second = two.submit(tasks.record, str(markers), "cross", 21)
    assert first.result(timeout=60) == 42
    assert second.result(timeout=60) == 42
    assert len((markers / "cross.runs").read_text().splitlines()) == 1

    from wove_adapters.adapters.base import BackendAdapter

    assert handle == BackendAdapter.safe_name(key) and " " not in handle and ":" not in handle
    assert redis_client().exists(handle), "taskiq's result backend stores the result under the key"
    # A third caller, long after: the recorded outcome answers, nothing runs again.
    three = hubs(taskiq_worker.config, ledger="memory://taskiq-three", delivery_idempotency_key=key)
    assert three.run(tasks.record, str(markers), "cross", 21) == 42
    assert len((markers / "cross.runs").read_text().splitlines()) == 1
    redis_client().delete(handle)


# ---------------------------------------------------------------- status and lost work


def test_status_finds_a_dead_worker_without_heartbeats(
    taskiq_worker: TaskiqWorker, hubs: Any, markers: Path
) -> None:
    """No heartbeat policy: the worker's lease lapses, status() says GONE, reconciliation
    applies the orphan policy (fail)."""
    config = {**taskiq_worker.config, "lease_seconds": 2}
    hub = hubs(config, delivery_orphan_policy="fail")
    future = hub.submit(tasks.sleepy, str(markers), "dead", 60.0)
    pid = int(wait_for_file(markers / "dead.started", 60))
    handle = _submission(hub, future.run_id)  # type: ignore[attr-defined]
    adapter = hub.dispatcher("t").transport.adapter
    assert shared_loop.run_sync(adapter.status(handle)) == JobState.RUNNING
    os.kill(_worker_of(pid), signal.SIGKILL)  # the taskiq worker process; its payload dies too
    try:
        with pytest.raises(DeliveryOrphanedError, match="gone"):
            future.result(timeout=60)
        assert shared_loop.run_sync(adapter.status(handle)) == JobState.GONE
        deadline = time.monotonic() + 15
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), "the payload process outlived its worker"
    finally:
        taskiq_worker.wait_ready()


def test_acknowledged_runs_end_with_their_final_state_and_no_lease(
    taskiq_worker: TaskiqWorker, hubs: Any
) -> None:
    """A run without a key whose caller took its outcome does not wait for its final
    state (``pool.LateWrites``, list brokers only): the states of a burst are written
    together shortly after, each ``succeeded``, each lease gone, and no caller's
    ``queued:<id>`` marker is left behind (the worker drops it as it begins)."""
    hub = hubs(taskiq_worker.config)
    adapter: Any = hub.dispatcher("t").transport.adapter  # type: ignore[attr-defined]
    values, handles = mapped_handles(hub, "t", tasks.add, 12)
    assert values == list(range(1, 13))
    assert len(handles) == 12
    prefix = adapter.prefix
    deadline = time.monotonic() + 10
    with redis_client() as client:
        while True:
            states = client.mget([f"{prefix}:state:{h}" for h in handles])
            leases = client.exists(*(f"{prefix}:lease:{h}" for h in handles))
            if set(states) == {b"succeeded"} and not leases:
                break
            assert time.monotonic() < deadline, (states, leases)
            time.sleep(0.05)
        assert client.exists(*(f"{prefix}:queued:{h}" for h in handles)) == 0


def test_killed_payload_process_is_reported_lost_at_once(
    taskiq_worker: TaskiqWorker, hubs: Any, markers: Path
) -> None:
    hub = hubs(taskiq_worker.config, delivery_orphan_policy="fail")
    future = hub.submit(tasks.die_once, str(markers), "lost")
    pid = int(wait_for_file(markers / "lost.pid", 60))
    handle = _submission(hub, future.run_id)  # type: ignore[attr-defined]
    started = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeliveryOrphanedError, match="payload process died"):
        future.result(timeout=60)
    assert time.monotonic() - started < 10
    adapter = hub.dispatcher("t").transport.adapter
    assert shared_loop.run_sync(adapter.status(handle)) == JobState.GONE


def test_cancel_of_queued_work_is_confirmed_without_a_worker(
    redis_available: None, hubs: Any
) -> None:
    """require_ack on a queue nobody consumes: the marker guarantees the job never runs,
    so status() reports CANCELLED and the caller's cancel is confirmed."""
    idle = f"wove-test-taskiq-nobody-{uuid.uuid4().hex[:6]}"
    hub = hubs({"url": REDIS_URL, "queue": idle}, delivery_cancel_mode="require_ack")
    client = redis_client()
    try:
        future = hub.submit(tasks.add, 1)
        handle = _submission(hub, future.run_id)  # type: ignore[attr-defined]
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=30)
        adapter = hub.dispatcher("t").transport.adapter
        assert shared_loop.run_sync(adapter.status(handle)) == JobState.CANCELLED
    finally:
        client.delete(idle)
        for key in client.scan_iter(match=f"wove:taskiq:{idle}:*"):
            client.delete(key)


@contextlib.contextmanager
def _queue_nobody_reads(hubs: Any, **config: Any) -> Iterator[tuple[Any, Any, str]]:
    """(adapter, Redis client, queue) for a queue no worker reads; its keys go after."""
    idle = f"wove-test-taskiq-nobody-{uuid.uuid4().hex[:6]}"
    hub = hubs({"url": REDIS_URL, "queue": idle, **config})
    client = redis_client()
    try:
        yield hub.dispatcher("t").transport.adapter, client, idle
    finally:
        client.delete(idle)
        for key in client.scan_iter(match=f"wove:taskiq:{idle}:*"):
            client.delete(key)
        client.close()


def _submit_together(adapter: Any, runs: int) -> list[str]:
    """``runs`` unkeyed jobs submitted in one loop turn (a mapped call's), their handles."""
    import asyncio

    from wove_adapters.adapters.base import JobSpec

    specs = [JobSpec(run_id=f"r:{i}", task_id="t", attempt=1, payload=f"wove1.p{i}",
                     idempotency_key=None, job_name=f"job-{i}", environment="t",
                     options={}) for i in range(runs)]

    async def submit_all() -> list[str]:
        return list(await asyncio.gather(*(adapter.submit(spec) for spec in specs)))

    return shared_loop.run_sync(submit_all())


def _pending_until_redis_loses_them(adapter: Any, client: Any, queue: str,
                                    handles: list[str]) -> None:
    """Each job has its ``queued:<id>`` marker and reads PENDING while no worker takes
    it; once the broker's Redis has lost the queue and the markers (a restart without
    persistence), GONE: lost, not pending for good, so the orphan policy can act."""
    markers = [f"wove:taskiq:{queue}:queued:{handle}" for handle in handles]
    assert client.exists(*markers) == len(handles)
    assert set(shared_loop.run_sync(adapter.status_many(handles)).values()) == {
        JobState.PENDING}
    client.delete(queue, *markers)
    assert set(shared_loop.run_sync(adapter.status_many(handles)).values()) == {JobState.GONE}


def test_kicks_of_one_loop_turn_share_one_lpush_in_order(
    redis_available: None, hubs: Any
) -> None:
    """Runs submitted together (a mapped call's) reach the list in one ``LPUSH``, in
    submission order (the oldest is the first a worker's ``BRPOP`` takes), each with its
    ``queued:<id>`` marker set in the same transaction, and each submit returns only once
    its message is in Redis."""
    with _queue_nobody_reads(hubs) as (adapter, client, idle):
        broker = adapter._broker
        lpush = broker._wove_lpush
        pushes: list[int] = []

        async def counted(queue: str, items: list[Any]) -> None:
            pushes.append(len(items))
            await lpush(queue, items)

        broker._wove_lpush = counted
        handles = _submit_together(adapter, 20)
        assert pushes == [20]
        queued = [json.loads(m)["task_id"] for m in reversed(client.lrange(idle, 0, -1))]
        assert queued == handles
        _pending_until_redis_loses_them(adapter, client, idle, handles)


def test_a_stream_job_the_broker_lost_is_gone(redis_available: None, hubs: Any) -> None:
    """Other brokers (a stream here) get their ``queued:<id>`` markers from one pipeline
    per loop turn, before the kicks."""
    with _queue_nobody_reads(hubs, broker="stream") as (adapter, client, idle):
        _pending_until_redis_loses_them(adapter, client, idle, _submit_together(adapter, 5))


# ---------------------------------------------------------------- wove


# ---------------------------------------------------------------- install hint


# ---------------------------------------------------------------- other brokers


def test_stream_broker_runs_cancels_and_drops_redeliveries(
    redis_available: None, hubs: Any, markers: Path, tmp_path: Path
) -> None:
    from taskiq_fixtures import start_worker, stop_worker

    queue = f"wove-test-taskiq-stream-{uuid.uuid4().hex[:6]}"
    worker = start_worker(queue, tmp_path / "stream.log", broker="stream")
    try:
        hub = hubs({"url": REDIS_URL, "queue": queue, "broker": "stream"})
        assert hub.map(tasks.add, range(5)) == [1, 2, 3, 4, 5]
        future = hub.submit(tasks.sleepy, str(markers), "stream", 30.0)
        wait_for_file(markers / "stream.started", 60)
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=30)
        # A finished job delivered again (stream brokers redeliver unacked messages) is
        # dropped by the worker, not run twice.
        done = hub.submit(tasks.record, str(markers), "redeliver", 1)
        assert done.result(timeout=60) == 2
        entries = redis_client().xrange(queue)
        last = entries[-1][1][b"data"]
        redis_client().xadd(queue, {b"data": last})
        time.sleep(2.0)
        assert len((markers / "redeliver.runs").read_text().splitlines()) == 1
        time.sleep(2.0)
        assert not (markers / "stream.finished").exists()
    finally:
        stop_worker(worker)


def test_users_own_broker_object(
    taskiq_worker: TaskiqWorker, hubs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """executor_config['broker'] = 'module:attribute': the caller kicks through the
    user's own broker (here: the very module the worker runs)."""
    import importlib

    monkeypatch.setenv("WOVE_TEST_TASKIQ_QUEUE", taskiq_worker.queue)
    monkeypatch.setenv("WOVE_TEST_TASKIQ_URL", taskiq_worker.url)
    module = importlib.import_module("taskiq_worker_app")
    importlib.reload(module)
    config = {**taskiq_worker.config, "broker": "taskiq_worker_app:broker"}
    hub = hubs(config)
    assert hub.run(tasks.add, 41) == 42


def test_a_message_cannot_point_the_worker_at_another_redis(
    taskiq_worker: TaskiqWorker, hubs: Any
) -> None:
    """The control address rides unsigned beside the payload: a queue writer who rewrites
    it gets no connection from the worker (which runs the verified payload without the
    foreign control keys), and the caller still gets its result."""
    import socket
    import threading

    attacker = socket.create_server(("127.0.0.1", 0))
    attacker.settimeout(0.2)
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(attacker.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    side = f"wove-test-taskiq-hold-{uuid.uuid4().hex[:6]}"
    hub = hubs({**taskiq_worker.config, "task_options": {"queue_name": side}})
    client = redis_client()
    try:
        future = hub.submit(tasks.add, 41)
        _wait_for_message(client, side)
        message = json.loads(client.lpop(side))
        control = message["kwargs"]["control"]
        control["url"] = f"redis://127.0.0.1:{attacker.getsockname()[1]}/0"
        client.rpush(taskiq_worker.queue, json.dumps(message))
        assert future.result(timeout=30) == 42
        time.sleep(0.5)
        assert connections == [], "the worker connected to a Redis a queue writer named"
        assert "not this worker's" in taskiq_worker.log.read_text()
    finally:
        stop.set()
        attacker.close()
        client.delete(side)
        client.close()
