"""ARQ-specific behaviour against a real Redis and real ``arq`` CLI workers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import arq_test_tasks
import pytest
from arq_services import PREFIX, REDIS_URL, SESSION, ArqWorker, environment, redis_client

from wove_adapters.adapters.arq import ArqAdapter
from wove_adapters.adapters.base import JobSpec
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file
from wove_adapters.worker.arq import CANCEL_KEY, RESULT_KEY, pack_record, read_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from hubs import hub_factory, mapped_handles
from services import wait_until

CancelledErrors = (concurrent.futures.CancelledError, asyncio.CancelledError)


@pytest.fixture
def hubs() -> Iterator[Callable[..., Hub]]:
    """``hubs(definition, name="arqtest")``: a Hub, closed at teardown."""
    with hub_factory("arqtest") as make:
        yield make


def adapter_of(hub: Hub) -> ArqAdapter:
    adapter = hub.dispatcher().transport.adapter  # type: ignore[attr-defined]
    assert isinstance(adapter, ArqAdapter)
    return adapter


def arq_result(job_id: str) -> Any:
    from arq.jobs import deserialize_result

    with redis_client() as client:
        raw = client.get(f"arq:result:{job_id}")
    return None if raw is None else deserialize_result(raw)


# ---------------------------------------------------------------- worker side, CLI


def test_the_arq_cli_runs_payloads_with_one_settings_line(make_worker: Any, hubs: Any) -> None:
    """``functions = [wove_adapters_run]`` in arq's own WorkerSettings (its defaults: 0.5 s
    polls, no aborts) and ``arq module.WorkerSettings`` is all a deployment needs."""
    worker: ArqWorker = make_worker("minimal", settings="MinimalWorkerSettings").start()
    hub = hubs(environment(queue_name=worker.queue))
    assert hub.run(tasks.add, 41) == 42
    assert hub.map(tasks.add, range(5)) == [1, 2, 3, 4, 5]


def test_runs_ending_together_share_their_way_back(make_worker: Any, hubs: Any) -> None:
    """Payload threads that end at the same moment send their terminal events in one
    request between them (``pool.Terminals``), not one each; every run still gets its
    own result. Each run also sends ``task_started`` (it outlives the short-task
    window), one request each: so fewer than two requests per run means some terminal
    events travelled together."""
    runs = 8
    worker: ArqWorker = make_worker(
        "together", env={"WOVE_TEST_ARQ_MAX_JOBS": str(runs)}).start()
    hub = hubs(environment(queue_name=worker.queue))
    assert hub.run(tasks.add, 1) == 2  # warm: the worker's threads and connection
    receiver = hub.dispatcher().transport.receiver  # type: ignore[attr-defined]
    before = receiver.stats["accepted"]
    at = time.time() + 1.5
    ended_together = functools.partial(arq_test_tasks.add_at, at)
    assert hub.map(ended_together, range(runs), map_chunk_size=0) == [
        x + 1 for x in range(runs)]
    assert receiver.stats["accepted"] - before < 2 * runs


# ---------------------------------------------------------------- options


def test_queue_name_routes_jobs_to_another_worker(
    arq_worker: ArqWorker, make_worker: Any, hubs: Any
) -> None:
    routed: ArqWorker = make_worker("routed").start()
    key = f"route-{uuid.uuid4().hex[:8]}"
    hub = hubs({**environment(task_options={"_queue_name": routed.queue}),
                "delivery_idempotency_key": key})
    assert hub.run(tasks.add, 1) == 2
    # The caller hears the result before ARQ records the job complete.
    wait_until(lambda: arq_result(PREFIX + key) is not None, what="ARQ's job record")
    info = arq_result(PREFIX + key)
    assert info.queue_name == routed.queue
    assert info.result["state"] == "succeeded"


def test_defer_by_and_expires_pass_through_and_a_deferred_job_cancels(
    arq_worker: ArqWorker, hubs: Any, markers: Path
) -> None:
    key = f"defer-{uuid.uuid4().hex[:8]}"
    hub = hubs({**environment(task_options={"_defer_by": 60, "_expires": 120}),
                "delivery_idempotency_key": key})
    adapter = adapter_of(hub)
    job_id = PREFIX + key
    future = hub.submit(tasks.sleepy, str(markers), "deferred", 0.1)
    with redis_client() as client:
        wait_until(lambda: client.exists(f"arq:job:{job_id}"), what="the enqueue")
        score = client.zscore(arq_worker.queue, job_id)
        assert score is not None and score / 1000 - time.time() > 50  # deferred ~60 s
        assert 100_000 < client.pttl(f"arq:job:{job_id}") <= 120_000  # _expires
        assert shared_loop.run_sync(adapter.status(job_id)) is JobState.PENDING
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=30)
        # A job no worker started leaves the queue at once, recorded as ARQ records an
        # aborted job (its result is CancelledError).
        wait_until(lambda: arq_result(job_id) is not None, what="the cancel")
        assert client.zscore(arq_worker.queue, job_id) is None
        assert not client.exists(f"arq:job:{job_id}")
        assert isinstance(arq_result(job_id).result, asyncio.CancelledError)
    assert shared_loop.run_sync(adapter.status(job_id)) is JobState.CANCELLED
    assert not (markers / "deferred.started").exists()


# ---------------------------------------------------------------- idempotency


def test_the_idempotency_key_is_the_arq_job_id_across_callers(
    arq_worker: ArqWorker, hubs: Any, markers: Path, tmp_path: Path
) -> None:
    """Callers that share no ledger still get one execution: ARQ refuses a second job
    with the same id, and the second caller follows the first job's recorded outcome."""
    key = f"user:{uuid.uuid4().hex[:8]} order 7"  # ':' and ' ' are sanitised
    job_id = PREFIX + ArqAdapter.safe_name(key, allowed=r"A-Za-z0-9_\-.:")
    assert job_id != PREFIX + key
    first = hubs({**environment(), "delivery_idempotency_key": key,
                  "ledger": f"sqlite:///{tmp_path / 'a.db'}"}, "a")
    second = hubs({**environment(), "delivery_idempotency_key": key,
                   "ledger": f"sqlite:///{tmp_path / 'b.db'}"}, "b")
    one = first.submit(tasks.record, str(markers), "native", 21)
    two = second.submit(tasks.record, str(markers), "native", 21)
    assert one.result(timeout=60) == 42
    assert two.result(timeout=60) == 42
    assert len((markers / "native.runs").read_text().splitlines()) == 1
    wait_until(lambda: arq_result(job_id) is not None, what="ARQ's job record")
    assert arq_result(job_id).result["state"] == "succeeded"
    # A third caller, after the job finished: the recorded result, no new execution.
    third = hubs({**environment(), "delivery_idempotency_key": key,
                  "ledger": f"sqlite:///{tmp_path / 'c.db'}"}, "c")
    assert third.run(tasks.record, str(markers), "native", 21) == 42
    assert len((markers / "native.runs").read_text().splitlines()) == 1


def test_a_failed_keyed_job_releases_its_key(
    arq_worker: ArqWorker, hubs: Any, markers: Path, tmp_path: Path
) -> None:
    key = f"retry-{uuid.uuid4().hex[:8]}"
    first = hubs({**environment(), "delivery_idempotency_key": key,
                  "ledger": f"sqlite:///{tmp_path / 'a.db'}"}, "a")
    with pytest.raises(RuntimeError, match="first try fails"):
        first.run(arq_test_tasks.fail_once, str(markers), "again")
    second = hubs({**environment(), "delivery_idempotency_key": key,
                   "ledger": f"sqlite:///{tmp_path / 'b.db'}"}, "b")
    assert second.run(arq_test_tasks.fail_once, str(markers), "again") == "again-ok"
    assert len((markers / "again.runs").read_text().splitlines()) == 2


def test_a_keyed_submit_drops_a_record_its_job_id_outlived(hubs: Any) -> None:
    """Our record of a job outlives ARQ's own keys (``keep_result`` against
    ``MARKER_TTL``): the next job with that id must not inherit it. The caller removes it
    before enqueueing, and only when none of ARQ's keys for the id exist (the worker no
    longer spends a Redis command per job on it)."""
    from dataclasses import replace

    from wove_adapters.worker.arq import DONE_KEY

    hub = hubs(environment(queue_name=f"{SESSION}-idle-stale"))  # no worker reads it
    adapter = adapter_of(hub)
    key = f"stale-{uuid.uuid4().hex[:8]}"
    spec = replace(_spec("unused"), idempotency_key=key)
    job_id = adapter.job_id(spec)
    stale = pack_record({"state": "succeeded", "run_id": "old", "attempt": 1})
    with redis_client() as client:
        client.set(RESULT_KEY + job_id, stale, px=60_000)
        client.set(DONE_KEY + job_id, stale, px=60_000)
        assert shared_loop.run_sync(adapter.submit(spec)) == job_id  # enqueued, not followed
        assert client.get(RESULT_KEY + job_id) is None
        assert client.get(DONE_KEY + job_id) is None
        # The job now exists (queued): a record written for it stays put.
        client.set(RESULT_KEY + job_id, stale, px=60_000)
        shared_loop.run_sync(adapter._drop_stale_record(job_id))
        assert client.get(RESULT_KEY + job_id) == stale


def test_an_acknowledged_runs_record_is_written_after_its_job(
    arq_worker: ArqWorker, hubs: Any
) -> None:
    """A run without a key whose caller took its outcome does not wait for its record
    (``pool.LateWrites``): the records of a burst land together, shortly after."""
    hub = hubs(environment(queue_name=arq_worker.queue))
    values, handles = mapped_handles(hub, "arqtest", tasks.add, 12)
    assert values == list(range(1, 13))
    assert len(handles) == 12

    def recorded() -> bool:
        with redis_client() as client:
            return all(raw is not None and read_record(raw)["state"] == "succeeded"
                       for raw in client.mget([RESULT_KEY + h for h in handles]))

    wait_until(recorded, what="every run's record", timeout=10)


# ---------------------------------------------------------------- status, reconciliation


def _spec(job_name: str, **options: Any) -> JobSpec:
    return JobSpec(run_id=f"t:{job_name}", task_id="t", attempt=1, payload="wove1.unused",
                   idempotency_key=None, job_name=job_name, environment="arqtest",
                   options=options)


def test_status_maps_every_arq_state(hubs: Any) -> None:
    """On a queue no worker reads, every native state is put in place by hand."""
    from arq.jobs import serialize_result

    idle = f"{SESSION}-idle"
    hub = hubs(environment(queue_name=idle, lease_seconds=1.0))
    adapter = adapter_of(hub)
    run = shared_loop.run_sync
    queued = run(adapter.submit(_spec("st-queued")))
    deferred = run(adapter.submit(_spec("st-deferred", _defer_by=60)))
    assert queued == PREFIX + "st-queued"
    assert run(adapter.status(queued)) is JobState.PENDING
    assert run(adapter.status(deferred)) is JobState.PENDING
    assert run(adapter.status(PREFIX + "st-never-submitted")) is JobState.GONE
    removed = run(adapter.submit(_spec("st-removed")))
    run(adapter.cancel(removed))  # queued, no worker: taken off the queue at once
    assert run(adapter.status(removed)) is JobState.CANCELLED

    with redis_client() as client:
        # in progress with a fresh lease: running; never leased for a lease period: gone
        client.set(f"arq:in-progress:{queued}", b"1", px=60_000)
        client.set(f"wove-adapters:arq:lease:{queued}", b"w", px=61_000)
        assert run(adapter.status(queued)) is JobState.RUNNING
        client.set(f"wove-adapters:arq:lease:{queued}", b"w", px=59_000)  # 2 s old: lapsed
        assert run(adapter.status(queued)) is JobState.GONE
        client.set(f"arq:in-progress:{deferred}", b"1", px=60_000)
        assert run(adapter.status(deferred)) is JobState.RUNNING  # a job's first moments
        time.sleep(1.2)
        assert run(adapter.status(deferred)) is JobState.GONE

        def complete(job_id: str, success: bool, result: Any) -> None:
            """What the worker leaves: ARQ's (pickled) result, which the caller never
            reads, and the msgpack record wove_adapters_run writes, which it does; an
            abort the caller asked for also leaves its cancel marker."""
            data = serialize_result("wove_adapters_run", (), {}, 1, 0, success, result, 0, 0,
                                    job_id, idle, job_id)
            assert data is not None
            client.set(f"arq:result:{job_id}", data, px=60_000)
            if success:
                client.set(RESULT_KEY + job_id, pack_record(result), px=60_000)
            elif isinstance(result, asyncio.CancelledError):
                client.set(CANCEL_KEY + job_id, b"1", px=60_000)

        cases = {
            "succeeded": (True, {"state": "succeeded"}, JobState.SUCCEEDED),
            "failed": (True, {"state": "failed"}, JobState.FAILED),
            "cancelled": (True, {"state": "cancelled"}, JobState.CANCELLED),
            "killed": (True, {"state": "killed"}, JobState.FAILED),
            "refused": (True, {"state": "refused", "exit_code": 2}, JobState.REFUSED),
            "aborted": (False, asyncio.CancelledError(), JobState.CANCELLED),
            "expired": (False, RuntimeError("job expired"), JobState.FAILED),
        }
        for name, (success, result, expected) in cases.items():
            job_id = PREFIX + f"st-{name}"
            complete(job_id, success, result)
            assert run(adapter.status(job_id)) is expected, name


def test_a_job_arq_failed_without_an_event_gets_its_orphan_policy(
    arq_worker: ArqWorker, hubs: Any
) -> None:
    """The job's key expires before the worker reaches it: ARQ records "job expired"
    and no event is ever sent. Reconciliation reads the failed state; policy ``fail``."""
    hub = hubs({**environment(task_options={"_defer_by": 1.0, "_expires": 0.3}),
                "delivery_orphan_policy": "fail"})
    started = time.monotonic()
    with pytest.raises(DeliveryOrphanedError, match="failed without a terminal event"):
        hub.run(tasks.add, 1)
    assert time.monotonic() - started < 60


def test_sigkilled_worker_arq_rerun_is_reported_lost_and_requeue_runs_once(
    make_worker: Any, hubs: Any, markers: Path
) -> None:
    """No heartbeat policy and a long lease, so only ARQ notices: its in-progress mark
    (job_timeout + 10 s) expires, a worker starts the job again (try 2), and
    wove_adapters_run reports the run lost instead of running it a second time. The
    dispatcher requeues (attempt 2, a new job): the task ran twice in all, once per
    attempt, and the caller gets exactly one result."""
    worker: ArqWorker = make_worker("sigkill", env={"WOVE_TEST_ARQ_JOB_TIMEOUT": "5"}).start()
    hub = hubs({**environment(queue_name=worker.queue, lease_seconds=300.0),
                "delivery_orphan_policy": "requeue"})
    future = hub.submit(tasks.die_once, str(markers), "rerun")
    pid = int(wait_for_file(markers / "rerun.pid", 60))
    assert pid == worker.pid  # thread isolation: the task ran inside the worker
    os.kill(pid, signal.SIGKILL)
    worker.restart()
    assert future.result(timeout=120) == "rerun-done"
    attempts = (markers / "rerun.attempts").read_text().splitlines()
    assert len(attempts) == 2, attempts
    assert hub.dispatcher().stats["requeued"] == 1
    assert "try=2" in worker.log_tail()


def test_worker_shutdown_lets_the_running_task_finish_once(
    make_worker: Any, hubs: Any, markers: Path
) -> None:
    """SIGTERM to an arq worker cancels its jobs (and ARQ retries them later). The
    running task finishes and delivers its result; the retry returns the recorded
    outcome instead of running the task again."""
    worker: ArqWorker = make_worker("shutdown").start()
    key = f"shutdown-{uuid.uuid4().hex[:8]}"
    hub = hubs({**environment(queue_name=worker.queue), "delivery_idempotency_key": key})
    future = hub.submit(arq_test_tasks.slow_record, str(markers), "graceful", 2.0)
    wait_for_file(markers / "graceful.runs", 60)
    worker.stop(timeout=60)
    assert future.result(timeout=60) == "graceful"
    worker.start()  # picks up ARQ's retry of the job
    wait_until(lambda: arq_result(PREFIX + key) is not None, what="the retried job")
    assert arq_result(PREFIX + key).result["state"] == "succeeded"
    assert len((markers / "graceful.runs").read_text().splitlines()) == 1


# ---------------------------------------------------------------- the way back


def test_the_redis_return_path(arq_worker: ArqWorker, hubs: Any) -> None:
    hub = hubs(environment(return_path="redis", return_redis_url=REDIS_URL))
    assert hub.run(tasks.add, 2) == 3
    assert hub.map(tasks.add, range(10)) == [i + 1 for i in range(10)]


# ---------------------------------------------------------------- doctor, start-up errors


def test_doctor_names_what_is_missing(arq_worker: ArqWorker, hubs: Any) -> None:
    rows = shared_loop.run_sync(adapter_of(hubs(environment())).doctor())
    checks = {check: (ok, detail) for check, ok, detail in rows}
    assert checks["broker reachable"][0], checks
    assert checks["worker listening on queue"][0], checks
    lonely = hubs(environment(queue_name=f"{SESSION}-nobody"), "lonely")
    rows = shared_loop.run_sync(adapter_of(lonely).doctor())
    ok, detail = {check: (ok, detail) for check, ok, detail in rows}["worker listening on queue"]
    assert not ok and "arq yourapp.WorkerSettings" in detail and "wove_adapters_run" in detail


def test_result_poll_delay_is_refused_at_start_up(hubs: Any) -> None:
    """The transport follows another caller's job now: the option is gone, and a config
    that still sets it fails like any typo."""
    from wove_adapters.core.errors import ExecutorConfigError

    hub = hubs(environment(result_poll_delay=0.05))
    with pytest.raises(ExecutorConfigError, match="result_poll_delay"):
        hub.run(tasks.add, 1)


def test_unreachable_redis_is_a_clear_start_up_error(hubs: Any) -> None:
    hub = hubs(environment(redis_url="redis://127.0.0.1:1/0"))
    with pytest.raises(ConnectionError, match="redis-server"):
        hub.run(tasks.add, 1)
