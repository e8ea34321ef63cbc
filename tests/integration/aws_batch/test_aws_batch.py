"""AWS Batch specifics, against moto (server mode) whose jobs really run through the Docker
Engine API shim: commands run and report over HTTP, non-zero exits are FAILED, array jobs,
batched describe_jobs, cancel_job vs terminate_job, pass-through options, names, doctor."""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from lost_runs import assert_killed_task_is_lost

from wove_adapters import Hub
from wove_adapters.adapters.base import JobSpec
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.policies import JobState
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file

JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def hub_for(config: dict[str, Any], **settings: Any) -> Hub:
    definition = {"executor": "aws_batch", "executor_config": config, **settings}
    return Hub(environments={"batch": definition}, default_environment="batch")


def adapter_of(hub: Hub) -> Any:
    return hub.dispatcher("batch").transport.adapter  # type: ignore[attr-defined]


def record_calls(adapter: Any, operation: str) -> list[dict[str, Any]]:
    """Every request the adapter's boto3 client makes for ``operation`` (its parameters)."""
    seen: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> None:
        seen.append(dict(params))

    adapter._client.meta.events.register(f"provide-client-params.batch.{operation}", hook)
    return seen


def wait_final(batch: Any, job_id: str, timeout: float = 90.0) -> dict[str, Any]:
    """describe_jobs once the job finished, plus ``exitCode`` (moto's describe_jobs leaves
    it out of ``container``; its list_jobs summary has it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = batch.describe_jobs(jobs=[job_id])["jobs"]
        if jobs and jobs[0]["status"] in ("SUCCEEDED", "FAILED"):
            described = dict(jobs[0])
            queue = described["jobQueue"].rsplit("/", 1)[-1]
            summaries = batch.list_jobs(jobQueue=queue, jobStatus=described["status"])
            for summary in summaries["jobSummaryList"]:
                if summary["jobId"] == job_id:
                    described["exitCode"] = summary.get("container", {}).get("exitCode")
            return described
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s")


def wait_status(batch: Any, job_id: str, wanted: set[str], timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    status = "?"
    while time.monotonic() < deadline:
        jobs = batch.describe_jobs(jobs=[job_id])["jobs"]
        status = jobs[0]["status"] if jobs else "missing"
        if status in wanted:
            return str(status)
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} stayed {status}, never reached {wanted}")


def whoami(directory: str) -> dict[str, str]:
    """Runs in the job: proves it ran there, as a process the shim started for moto."""
    Path(directory, "ran").write_text(str(os.getpid()))
    return {
        "pid": str(os.getpid()),
        "job_id": os.environ.get("AWS_BATCH_JOB_ID", ""),
        "option": os.environ.get("WOVE_TEST_OPTION", ""),
    }


def run_id_of(future: Any) -> str:
    return str(future.run_id)


# ---------------------------------------------------------------- the jobs really run


def test_the_job_command_runs_and_its_result_comes_back_over_http(
    batch_stack: Any, batch_config: dict[str, Any], tmp_path: Path
) -> None:
    with hub_for(batch_config) as hub:
        receiver = hub.dispatcher("batch").transport.receiver  # type: ignore[attr-defined]
        before = receiver.stats["accepted"]
        future = hub.submit(whoami, str(tmp_path))
        result = future.result(timeout=90)
        run = hub.dispatcher("batch").runs.get(run_id_of(future))
        assert receiver.stats["accepted"] > before, "the result did not come through the receiver"
    assert result["pid"] == (tmp_path / "ran").read_text()
    assert result["pid"] != str(os.getpid())
    # The job's own id, as moto set it in the container's environment.
    described = batch_stack.client("batch").describe_jobs(jobs=[result["job_id"]])["jobs"]
    assert described and described[0]["jobName"].startswith("wove-whoami-")
    command = described[0]["container"]["command"]
    assert command[1:4] == ["-m", "wove_adapters.worker", "--payload-ref"]
    final = wait_final(batch_stack.client("batch"), result["job_id"])
    assert final["status"] == "SUCCEEDED" and final["exitCode"] == 0
    assert run is None or run.done.is_set()


def test_a_command_that_exits_nonzero_is_failed_in_describe_jobs(batch_stack: Any) -> None:
    batch = batch_stack.client("batch")
    names = batch_stack.names

    def submit(code: int) -> str:
        return str(batch.submit_job(
            jobName=f"exit-{code}-{uuid.uuid4().hex[:6]}", jobQueue=names["queue"],
            jobDefinition=names["definition"],
            containerOverrides={"command": [sys.executable, "-c", f"import sys; sys.exit({code})"]},
        )["jobId"])

    failing, passing = submit(3), submit(0)
    failed = wait_final(batch, failing)
    assert failed["status"] == "FAILED"
    assert failed["exitCode"] == 3
    succeeded = wait_final(batch, passing)
    assert succeeded["status"] == "SUCCEEDED" and succeeded["exitCode"] == 0


def test_worker_exit_code_one_is_failed_state(
    batch_stack: Any, batch_config: dict[str, Any]
) -> None:
    """A task that raised: the worker exits 1, so Batch (and status()) say FAILED."""
    with hub_for(batch_config) as hub:
        adapter = adapter_of(hub)
        submits = record_calls(adapter, "SubmitJob")
        with pytest.raises(tasks.ConformanceError):
            hub.run(tasks.fail, "exit one")
        assert len(submits) == 1
    batch = batch_stack.client("batch")
    listed = batch.list_jobs(
        jobQueue=batch_stack.names["queue"],
        filters=[{"name": "JOB_NAME", "values": [submits[0]["jobName"]]}],
    )["jobSummaryList"]
    final = wait_final(batch, listed[0]["jobId"])
    assert final["status"] == "FAILED" and final["exitCode"] == 1


# ---------------------------------------------------------------- arrays and naming


def test_a_mapped_task_is_one_array_job(batch_stack: Any, batch_config: dict[str, Any]) -> None:
    with hub_for(batch_config) as hub:
        transport = hub.dispatcher("batch").transport
        adapter = adapter_of(hub)
        submits = record_calls(adapter, "SubmitJob")
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100)) == [i + 1 for i in range(100)]
        array_seconds = time.perf_counter() - start
        assert len(submits) == 1, f"100 items took {len(submits)} SubmitJob calls, not 1"
        assert submits[0]["arrayProperties"] == {"size": 100}
        assert transport.stats["array_submissions"] >= 1  # type: ignore[attr-defined]
        # Nothing but a reference travels in the request (SubmitJob is limited to 30 KiB).
        assert "wove1." not in repr(submits[0]) and len(repr(submits[0])) < 2048
    # The same 100 items as separate jobs (the keys turn array batching off).
    with hub_for(batch_config, delivery_idempotency_key="{x}-" + uuid.uuid4().hex) as hub:
        submits = record_calls(adapter_of(hub), "SubmitJob")
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100)) == [i + 1 for i in range(100)]
        single_seconds = time.perf_counter() - start
        assert len(submits) == 100
    print(f"aws_batch 100 items: array 1 submission {array_seconds:.2f}s; "
          f"separate 100 submissions {single_seconds:.2f}s")


def test_job_names_obey_aws_rules() -> None:
    from wove_adapters.adapters.aws_batch import AwsBatchAdapter

    adapter = AwsBatchAdapter({}, environment="t")
    keys = ["report:2024-01-01", "a" * 300, "-leading", "späce and/slash", "_x"]
    names = set()
    for key in keys:
        job = JobSpec(run_id="r", task_id="t", attempt=1, payload="wove1.x",
                      idempotency_key=key, job_name="wove-t-r-1", environment="t")
        name = adapter._job_name(job)
        assert JOB_NAME.match(name), name
        names.add(name)
    assert len(names) == len(keys)
    # wove's own default (run id with ':') is made safe too.
    plain = JobSpec(run_id="run:abc", task_id="t", attempt=1, payload="wove1.x",
                    idempotency_key=None, job_name="wove:t:abc", environment="t")
    assert JOB_NAME.match(adapter._job_name(plain))


def test_a_key_with_colons_submits(batch_config: dict[str, Any], tmp_path: Path) -> None:
    key = f"daily:report:{uuid.uuid4().hex}"
    with hub_for(batch_config, delivery_idempotency_key=key) as hub:
        submits = record_calls(adapter_of(hub), "SubmitJob")
        assert hub.run(tasks.record, str(tmp_path), "colon", 2) == 4
    assert JOB_NAME.match(submits[0]["jobName"]) and ":" not in submits[0]["jobName"]


def test_same_key_is_one_job_through_the_ledger(
    batch_config: dict[str, Any], tmp_path: Path
) -> None:
    key = f"batch-{uuid.uuid4().hex[:8]}"
    with hub_for(batch_config, delivery_idempotency_key=key) as hub:
        submits = record_calls(adapter_of(hub), "SubmitJob")
        futures = [hub.submit(tasks.record, str(tmp_path), "k", 3) for _ in range(3)]
        assert [f.result(timeout=90) for f in futures] == [6, 6, 6]
        assert len(submits) == 1
    assert len((tmp_path / "k.runs").read_text().splitlines()) == 1


# ---------------------------------------------------------------- options


def test_options_pass_through(
    batch_stack: Any, batch_config: dict[str, Any], tmp_path: Path
) -> None:
    config = {
        **batch_config,
        "timeout": 600,
        "retry_strategy": {"attempts": 1},
        "tags": {"team": "wove"},
        "parameters": {"p": "v"},
        "container_overrides": {"environment": [{"name": "WOVE_TEST_BASE", "value": "1"}]},
        "task_options": {"environment": {"WOVE_TEST_OPTION": "from-task-options"},
                         "scheduling_priority": 5},
    }
    with hub_for(config) as hub:
        submits = record_calls(adapter_of(hub), "SubmitJob")
        result = hub.run(whoami, str(tmp_path))
    assert result["option"] == "from-task-options"  # reached the job's process
    request = submits[0]
    assert request["timeout"] == {"attemptDurationSeconds": 600}
    assert request["retryStrategy"] == {"attempts": 1}
    assert request["tags"] == {"team": "wove"}
    assert request["parameters"] == {"p": "v"}
    assert request["schedulingPriorityOverride"] == 5
    env = {e["name"]: e["value"] for e in request["containerOverrides"]["environment"]}
    assert env == {"WOVE_TEST_BASE": "1", "WOVE_TEST_OPTION": "from-task-options"}
    described = batch_stack.client("batch").describe_jobs(jobs=[result["job_id"]])["jobs"][0]
    assert described["timeout"] == {"attemptDurationSeconds": 600}
    assert described["tags"] == {"team": "wove"}


# ---------------------------------------------------------------- status and cancel


def test_status_is_one_describe_jobs_call_per_hundred_jobs(batch_config: dict[str, Any]) -> None:
    from wove_adapters.adapters.aws_batch import AwsBatchAdapter

    adapter = AwsBatchAdapter(batch_config, environment="t")
    handles = [f"no-such-job-{i}" for i in range(150)]

    async def statuses() -> list[JobState]:
        await adapter.start()
        calls = record_calls(adapter, "DescribeJobs")
        for handle in handles:
            adapter._track(handle, f"k{handle}")
        states = await adapter.status_many(handles)
        assert len(calls) == 2, f"{len(calls)} DescribeJobs calls for 150 jobs"
        assert all(len(c["jobs"]) <= 100 for c in calls)
        return [states[handle] for handle in handles]

    states = shared_loop.run_sync(statuses())
    assert set(states) == {JobState.UNKNOWN}  # just submitted: not yet GONE


def test_state_map() -> None:
    from wove_adapters.adapters.aws_batch import CANCEL_REASON, AwsBatchAdapter, _exit_code

    adapter = AwsBatchAdapter({}, environment="t")
    for native in ("SUBMITTED", "PENDING", "RUNNABLE"):
        assert adapter.map_state(native) is JobState.PENDING
    assert adapter.map_state("STARTING") is JobState.RUNNING
    assert adapter.map_state("SUCCEEDED") is JobState.SUCCEEDED
    exited = "Essential container in task exited"
    assert adapter._state_of("FAILED", exited, 1) is JobState.FAILED  # the task raised
    assert adapter._state_of("FAILED", exited, 3) is JobState.FAILED  # outcome undelivered
    assert adapter._state_of("FAILED", exited, None) is JobState.FAILED
    assert adapter._state_of("FAILED", exited, 2) is JobState.REFUSED  # the worker refused
    assert adapter._state_of("FAILED", CANCEL_REASON, 137) is JobState.CANCELLED
    assert _exit_code({"container": {"exitCode": 2}}) == 2
    assert _exit_code({"attempts": [{"container": {"exitCode": 1}},
                                    {"container": {"exitCode": 2}}]}) == 2
    assert _exit_code({"status": "RUNNING", "container": {}}) is None
    assert adapter.map_state("SOMETHING_NEW") is JobState.UNKNOWN


def test_a_job_that_dies_without_an_event_is_lost(
    batch_config: dict[str, Any], tmp_path: Path
) -> None:
    # No heartbeat policy: only describe_jobs (FAILED, exit 137) can tell.
    with hub_for(batch_config, delivery_orphan_policy="fail") as hub:
        assert_killed_task_is_lost(hub, tmp_path, 90)


def test_cancel_queued_uses_cancel_job(
    batch_stack: Any, batch_config: dict[str, Any], tmp_path: Path
) -> None:
    batch = batch_stack.client("batch")
    names = batch_stack.names
    blocker = str(batch.submit_job(
        jobName=f"blocker-{uuid.uuid4().hex[:6]}", jobQueue=names["queue"],
        jobDefinition=names["definition"],
        containerOverrides={"command": [sys.executable, "-c", "import time; time.sleep(60)"]},
    )["jobId"])
    depends = {"submit_options": {"dependsOn": [{"jobId": blocker}]}}
    config = {**batch_config, "task_options": depends}
    try:
        with hub_for(config, delivery_cancel_mode="require_ack") as hub:
            adapter = adapter_of(hub)
            cancels = record_calls(adapter, "CancelJob")
            future = hub.submit(tasks.sleepy, str(tmp_path), "queued", 0.1)
            handle = wait_for_handle(hub, future)
            assert wait_status(batch, handle, {"PENDING", "RUNNABLE"}) in ("PENDING", "RUNNABLE")
            hub.cancel(future)
            with pytest.raises(CancelledErrors):
                future.result(timeout=60)
            assert [c["jobId"] for c in cancels] == [handle]
        final = wait_final(batch, handle)
        assert final["status"] == "FAILED"
        assert final["statusReason"].startswith("wove-adapters: cancelled")
        assert not (tmp_path / "queued.started").exists()
    finally:
        batch.terminate_job(jobId=blocker, reason="test over")


def wait_for_handle(hub: Hub, future: Any, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = hub.dispatcher("batch").runs.get(run_id_of(future))
        if run is not None and run.attempt.submission:
            return str(run.attempt.submission)
        time.sleep(0.02)
    raise AssertionError("the run was never submitted")


def test_cancel_running_terminates_and_describe_jobs_confirms(
    batch_stack: Any, batch_config: dict[str, Any], tmp_path: Path
) -> None:
    batch = batch_stack.client("batch")
    with hub_for(batch_config, delivery_cancel_mode="require_ack") as hub:
        adapter = adapter_of(hub)
        terminates = record_calls(adapter, "TerminateJob")
        cancels = record_calls(adapter, "CancelJob")
        future = hub.submit(tasks.sleepy, str(tmp_path), "running", 30.0)
        wait_for_file(tmp_path / "running.started", 90)
        handle = wait_for_handle(hub, future)
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=60)
        assert [t["jobId"] for t in terminates] == [handle] and not cancels
    final = wait_final(batch, handle)
    assert final["status"] == "FAILED" and final["exitCode"] == 137
    assert final["statusReason"].startswith("wove-adapters: cancelled")
    time.sleep(1.0)
    assert not (tmp_path / "running.finished").exists()


# ---------------------------------------------------------------- store, doctor


def test_s3_store_round_trip(batch_stack: Any) -> None:
    from wove_adapters.core import stores as payload_mod
    from wove_adapters.core.errors import PayloadError

    store = payload_mod.open_store(batch_stack.store_url)
    assert type(store).__name__ == "S3Store"
    ref = store.put(f"probe-{uuid.uuid4().hex}", b"x" * 1000)
    assert store.get(ref) == b"x" * 1000
    store.delete(ref)
    with pytest.raises(PayloadError, match="missing"):
        store.get(ref)
    with pytest.raises(PayloadError):
        store.put("../escape", b"")


def test_doctor_rows(batch_stack: Any, batch_config: dict[str, Any]) -> None:
    from wove_adapters.adapters.aws_batch import AwsBatchAdapter

    async def rows_for(config: dict[str, Any]) -> list[tuple[str, bool, str]]:
        adapter = AwsBatchAdapter(config, environment="t")
        await adapter.start()
        return await adapter.doctor()

    good = shared_loop.run_sync(rows_for(batch_config))
    assert all(ok for _, ok, _ in good), good
    checks = " | ".join(check for check, _, _ in good)
    for expected in ("endpoint reachable", "job queue", "compute environment", "job definition",
                     "S3 bucket"):
        assert expected in checks
    # A disabled queue, a missing definition and a missing bucket each fail their row.
    batch = batch_stack.client("batch")
    queue = f"{batch_stack.names['tag']}-off"
    compute = batch.describe_job_queues(jobQueues=[batch_stack.names["queue"]])["jobQueues"][0][
        "computeEnvironmentOrder"]
    batch.create_job_queue(jobQueueName=queue, state="DISABLED", priority=1,
                           computeEnvironmentOrder=compute)
    bad = shared_loop.run_sync(rows_for({
        **batch_config, "job_queue": queue, "job_definition": "no-such-definition",
        "payload_store": batch_stack.store_url.replace(
            batch_stack.names["bucket"], "no-such-bucket"
        ),
    }))
    failed = {check.split(" '")[0] for check, ok, _ in bad if not ok}
    assert failed == {"job queue", "job definition", "payload store reachable (S3 bucket)"}, bad


def test_start_fails_clearly(batch_config: dict[str, Any]) -> None:
    from wove_adapters.adapters.aws_batch import AwsBatchAdapter, AwsBatchError

    for config, message in (
        ({**batch_config, "job_queue": "no-such-queue"}, "does not exist"),
        ({**batch_config, "payload_store": ""}, "payload_store"),
        ({k: v for k, v in batch_config.items() if k != "job_definition"}, "job_definition"),
        ({**batch_config, "endpoint_url": "http://127.0.0.1:9", "max_attempts": 1},
         "cannot reach AWS Batch"),
    ):
        adapter = AwsBatchAdapter(config, environment="t")
        with pytest.raises(AwsBatchError, match=message):
            shared_loop.run_sync(adapter.start())
