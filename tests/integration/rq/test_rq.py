"""RQ-specific behaviour, against a real Redis and real ``rq worker`` processes."""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from lazy_imports import assert_imports_without
from rq_services import RqWorker, cleanup_queue, redis_client

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file


def _hub(environment: dict[str, Any], **settings: Any) -> Hub:
    return Hub(environments={"r": {**environment, **settings}}, default_environment="r")


def _job(job_id: str) -> Any:
    from rq.job import Job

    return Job.fetch(job_id, connection=redis_client())


# ---------------------------------------------------------------- the worker side


def test_module_import_does_not_import_rq() -> None:
    assert_imports_without("wove_adapters.adapters.rq", ["rq", "redis"],
                           "assert callable(m.run_payload)")


def test_worker_class_is_rqs_forking_worker() -> None:
    import rq

    from wove_adapters.adapters import rq as adapter_module

    assert issubclass(adapter_module.Worker, rq.Worker)
    assert adapter_module.Worker.__module__ == "wove_adapters.adapters.rq"


def test_plain_rq_cli_worker_runs_payloads(redis_url: str, rq_logs: Path) -> None:
    """``rq worker <queue>`` with RQ's own default worker class, nothing of ours preloaded."""
    queue = f"wove-test-rq-plain-{uuid.uuid4().hex[:8]}"
    worker = RqWorker(queue, rq_logs, worker_class=None).wait_ready()
    try:
        hub = _hub({"executor": "rq", "executor_config": {"redis_url": redis_url, "queue": queue}})
        try:
            assert hub.run(tasks.add, 2, y=3) == 5
            assert hub.map(tasks.add, range(4)) == [1, 2, 3, 4]
            with pytest.raises(tasks.ConformanceError):
                hub.run(tasks.fail, "plain worker")
        finally:
            hub.close()
    finally:
        worker.stop()
        cleanup_queue(queue)


# ---------------------------------------------------------------- options and ids


def test_options_pass_through(rq_environment: dict[str, Any], markers: Path) -> None:
    key = f"opts:{uuid.uuid4().hex[:8]}/x"  # ':' and '/' are not allowed in RQ job ids
    config = {
        **rq_environment["executor_config"],
        "job_timeout": 321,
        "result_ttl": 654,
        "failure_ttl": 987,
        "meta": {"team": "reports"},
        "task_options": {"description": "nightly report", "meta": {"owner": "ops"}},
    }
    hub = _hub({"executor": "rq", "executor_config": config}, delivery_idempotency_key=key)
    try:
        assert hub.run(tasks.record, str(markers), "opts", 4) == 8
    finally:
        hub.close()
    job_id = BackendAdapter.safe_name(key)
    assert job_id != key and all(c.isalnum() or c in "_-" for c in job_id)
    job = _job(job_id)
    assert job.origin == rq_environment["executor_config"]["queue"]
    assert job.func_name == "wove_adapters.adapters.rq.run_payload"
    assert (job.timeout, job.result_ttl, job.failure_ttl) == (321, 654, 987)
    assert job.description == "nightly report"
    assert job.meta["owner"] == "ops" and job.meta["wove_task_id"] == "record"
    assert "team" not in job.meta  # task_options' meta replaces executor_config's


def test_job_timeout_is_enforced_by_rq(rq_environment: dict[str, Any], markers: Path) -> None:
    """RQ's own death penalty interrupts the task; the caller gets RQ's exception."""
    from rq.timeouts import JobTimeoutException

    config = {**rq_environment["executor_config"], "task_options": {"job_timeout": 1}}
    hub = _hub({"executor": "rq", "executor_config": config})
    try:
        with pytest.raises(JobTimeoutException):
            hub.run(tasks.sleepy, str(markers), "too-slow", 5.0)
    finally:
        hub.close()
    assert not (markers / "too-slow.finished").exists()


def test_queue_and_at_front_reach_rq(redis_url: str) -> None:
    """Submit straight through the adapter to a queue nobody serves: the job waits there
    with our options, status maps it, cancel removes it."""
    from rq import Queue

    from wove_adapters.adapters.rq import RqAdapter

    queue = f"wove-test-rq-idle-{uuid.uuid4().hex[:8]}"
    adapter = RqAdapter({"redis_url": redis_url, "queue": "unused"}, environment="t")

    async def scenario() -> tuple[Any, ...]:
        await adapter.start()
        spec = JobSpec(run_id="t:1", task_id="t", attempt=1, payload="wove1.not-a-payload",
                       idempotency_key=None, job_name="wove-t-1-1", environment="t",
                       options={"queue": queue})
        first = await adapter.submit(spec)
        second = await adapter.submit(
            JobSpec(**{**spec.__dict__, "run_id": "t:2", "job_name": "wove-t-2-1",
                       "options": {"queue": queue, "at_front": True}})
        )
        states = (await adapter.status(first), await adapter.status("no-such-job"))
        await adapter.cancel(first)
        after = await adapter.status(first)
        await adapter.cancel(second)
        await adapter.aclose()
        return first, second, states, after

    try:
        first, second, states, after = shared_loop.run_sync(scenario())
        assert states == (JobState.PENDING, JobState.GONE)
        assert after is JobState.CANCELLED
        assert not Queue(queue, connection=redis_client()).job_ids
    finally:
        cleanup_queue(queue)
    assert (first, second) == ("wove-t-1-1", "wove-t-2-1")


def test_state_map_covers_every_rq_status() -> None:
    from rq.job import JobStatus

    from wove_adapters.adapters.rq import RqAdapter

    for status in JobStatus:
        assert RqAdapter.map_state(status.value) is not JobState.UNKNOWN, status
    assert RqAdapter.map_state("something-new") is JobState.UNKNOWN


def test_native_idempotency_across_callers(rq_environment: dict[str, Any], markers: Path) -> None:
    """Two callers that share no ledger submit one key: RQ's job id makes it one
    execution, both get the result, and a later caller gets the recorded result."""
    key = f"native:{uuid.uuid4().hex}"
    hubs = [Hub(environments={"r": {**rq_environment, "delivery_idempotency_key": key}},
                default_environment="r", ledger=f"memory://rq-{i}-{uuid.uuid4().hex[:6]}")
            for i in range(3)]
    try:
        futures = [hub.submit(tasks.record, str(markers), "native", 5) for hub in hubs[:2]]
        assert [f.result(timeout=60) for f in futures] == [10, 10]
        assert len((markers / "native.runs").read_text().splitlines()) == 1
        assert _job(BackendAdapter.safe_name(key)).get_status() == "finished"
        # A third caller, no ledger entry: answered from the job's recorded outcome.
        assert hubs[2].run(tasks.record, str(markers), "native", 5) == 10
        assert len((markers / "native.runs").read_text().splitlines()) == 1
    finally:
        for hub in hubs:
            hub.close()


def test_cancelling_a_follower_leaves_the_owners_job_running(
    rq_environment: dict[str, Any], markers: Path
) -> None:
    key = f"native-cancel-{uuid.uuid4().hex}"
    owner, follower = [
        Hub(environments={"r": {**rq_environment, "delivery_idempotency_key": key,
                                "delivery_cancel_mode": "require_ack"}},
            default_environment="r", ledger=f"memory://rq-fc-{i}-{uuid.uuid4().hex[:6]}")
        for i in range(2)
    ]
    try:
        first = owner.submit(tasks.sleepy, str(markers), "shared", 2.0)
        wait_for_file(markers / "shared.started", 60)
        second = follower.submit(tasks.sleepy, str(markers), "shared", 2.0)
        time.sleep(0.5)  # let the follower attach to the owner's job
        follower.cancel(second)
        with pytest.raises(CancelledErrors):
            second.result(timeout=30)
        assert first.result(timeout=60) == "shared"
        assert (markers / "shared.finished").exists()
    finally:
        owner.close()
        follower.close()


def test_recorded_error_comes_back_with_its_type(rq_environment: dict[str, Any]) -> None:
    key = f"native-err-{uuid.uuid4().hex}"
    hubs = [Hub(environments={"r": {**rq_environment, "delivery_idempotency_key": key}},
                default_environment="r", ledger=f"memory://rq-err-{i}-{uuid.uuid4().hex[:6]}")
            for i in range(2)]
    try:
        for hub in hubs:
            with pytest.raises(tasks.ConformanceError, match="recorded"):
                hub.run(tasks.fail, "recorded")
    finally:
        for hub in hubs:
            hub.close()


# ---------------------------------------------------------------- a job that died silently


@pytest.mark.parametrize("policy", ["fail", "requeue"])
def test_killed_work_horse_found_by_reconciliation(
    rq_environment: dict[str, Any], markers: Path, policy: str
) -> None:
    """No heartbeat policy: only status() (RQ marks the job failed) finds the loss."""
    hub = _hub(rq_environment, delivery_orphan_policy=policy)
    try:
        tag = f"silent-{policy}"
        future = hub.submit(tasks.die_once, str(markers), tag)
        pid = int(wait_for_file(markers / f"{tag}.pid", 60))
        os.kill(pid, signal.SIGKILL)
        if policy == "fail":
            with pytest.raises(DeliveryOrphanedError, match="failed without a terminal event"):
                future.result(timeout=60)
        else:
            assert future.result(timeout=90) == f"{tag}-done"
            assert len((markers / f"{tag}.attempts").read_text().splitlines()) == 2
            assert hub.dispatcher("r").stats["requeued"] >= 1
    finally:
        hub.close()


# ---------------------------------------------------------------- wove


# ---------------------------------------------------------------- doctor, install hint


def test_doctor_rows(rq_environment: dict[str, Any], redis_url: str) -> None:
    """The adapter's rows (Redis, a worker on the queue), then the transport's row of the
    return path it opened (the receiver answers its health check, or the drop box's
    Redis answers)."""

    def rows_for(config: dict[str, Any]) -> list[tuple[str, bool, str]]:
        hub = _hub({"executor": "rq", "executor_config": config})
        try:
            return shared_loop.run_sync(hub.dispatcher("r").transport.doctor())
        finally:
            hub.close()

    rows = rows_for(rq_environment["executor_config"])
    assert [(check, ok) for check, ok, _ in rows][2:] == [("receiver reachable", True)], rows
    assert [ok for _, ok, _ in rows] == [True, True, True], rows
    idle = f"wove-test-rq-nobody-{uuid.uuid4().hex[:6]}"
    rows = rows_for({"redis_url": redis_url, "queue": idle})
    worker_row = rows[1]
    assert not worker_row[1] and f"rq worker {idle}" in worker_row[2]
    dropbox = rows_for({**rq_environment["executor_config"], "return_path": "redis",
                        "return_redis_url": redis_url})
    assert dropbox[2][:2] == ("return path (redis drop box) reachable", True)


def test_unreachable_redis_is_a_clear_start_error() -> None:
    hub = _hub({"executor": "rq", "executor_config": {"redis_url": "redis://127.0.0.1:1/0"}})
    try:
        with pytest.raises(ConnectionError, match="redis-server"):
            hub.run(tasks.add, 1)
    finally:
        hub.close()


def test_a_run_cancelled_while_queued_leaves_no_hash_forever(redis_url: str) -> None:
    """RQ gives a cancelled job's hash no TTL; ours sets one (failure_ttl, else a day)."""
    from rq.registry import CanceledJobRegistry

    queue = f"wove-test-rq-cancel-ttl-{uuid.uuid4().hex[:8]}"  # no worker: stays queued
    hub = _hub({"executor": "rq", "executor_config": {"redis_url": redis_url, "queue": queue}})
    try:
        future = hub.submit(tasks.add, 1, y=2)
        deadline = time.monotonic() + 20
        while not redis_client().llen(f"rq:queue:{queue}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis_client().llen(f"rq:queue:{queue}") == 1, "the job never reached RQ"
        hub.cancel(future, mode="best_effort")
        assert future.cancelled() or isinstance(future.exception(timeout=10), CancelledErrors)
        ids = CanceledJobRegistry(queue, connection=redis_client()).get_job_ids()
        assert len(ids) == 1, ids
        ttl = redis_client().ttl(f"rq:job:{ids[0]}")
        assert 0 < ttl <= 86400, f"cancelled job hash TTL {ttl} (-1: kept forever)"
    finally:
        hub.close()
        cleanup_queue(queue)
