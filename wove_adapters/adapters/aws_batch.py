"""``aws_batch``: each task is an AWS Batch job; a mapped task is one array job.

boto3 runs off the event loop (``asyncio.to_thread``, one client per adapter). The signed
payload goes to a payload store (S3: ``s3://bucket/prefix``) and the job's container
command carries only its reference (``python -m wove_adapters.worker --payload-ref
s3://...#key``), so nothing large travels in SubmitJob (limited to 30 KiB). Status comes
from ``describe_jobs``, batched: ``status_many`` is one call per 100 jobs asked about.
Cancel is ``cancel_job`` for queued work and ``terminate_job``
for started work; a job that failed after our own cancel (its ``statusReason`` is ours)
reads as CANCELLED, which is how ``require_ack`` is confirmed when the container was
killed before our worker could report ``task_cancelled``. A job that failed with the
worker's exit code 2 reads as REFUSED: the worker could not verify the payload and says
so no other way (the run fails with a PayloadError naming the key, never requeued).
Batch has no dedupe, so idempotency is the ledger's. The ``s3://`` payload store itself
is ``core.stores.S3Store``: workers of every backend open it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core import stores as payload_mod
from wove_adapters.core.aio import submit_grouped, undone_if_abandoned
from wove_adapters.core.doctor import Row, store_row
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker.runner import EXIT_PAYLOAD_REFUSED, worker_command

# AWS Batch's job statuses in the shared vocabulary.
_STATES: dict[str, JobState] = {
    "SUBMITTED": JobState.PENDING,
    "PENDING": JobState.PENDING,
    "RUNNABLE": JobState.PENDING,
    "STARTING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
}
_QUEUED = frozenset({"SUBMITTED", "PENDING", "RUNNABLE"})
_FINISHED = frozenset({"SUCCEEDED", "FAILED"})

# The statusReason we give cancel_job/terminate_job: a FAILED job carrying it was cancelled.
CANCEL_REASON = "wove-adapters: cancelled by the caller"

# DescribeJobs takes at most 100 job ids; array jobs at most 10,000 children.
_DESCRIBE_BATCH = 100
_ARRAY_MAX = 10_000

# An array child finds its payload by index. AWS sets AWS_BATCH_JOB_ARRAY_INDEX; a child's
# job id is always "<parent id>:<index>", the fallback for emulators that omit the former.
_ARRAY_SCRIPT = (
    'exec "$0" -m wove_adapters.worker '
    '--payload-ref "$1-${AWS_BATCH_JOB_ARRAY_INDEX:-${AWS_BATCH_JOB_ID##*:}}"'
)


class AwsBatchError(RuntimeError):
    """An AWS Batch call failed or the configuration cannot work; the message says why."""


class AwsBatchOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``aws_batch`` (docs/adapters/aws_batch.md)."""

    job_queue: str | None = None  # required
    job_definition: str | None = None  # required
    region: str | None = None
    region_name: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    python: str = "python"
    container_overrides: dict[str, Any] = {}
    environment: dict[str, Any] = {}
    retry_strategy: dict[str, Any] | None = None
    timeout: int | float | dict[str, Any] | None = None
    parameters: dict[str, Any] | None = None
    tags: dict[str, Any] | None = None
    propagate_tags: bool | None = None
    scheduling_priority: int | None = None
    share_identifier: str | None = None
    submit_options: dict[str, Any] = {}
    verify_on_start: bool = True
    max_pool_connections: int = 32
    max_attempts: int = 5


class AwsBatchAdapter(BackendAdapter):
    name = "aws_batch"
    config_struct = AwsBatchOptions
    required_modules = ("boto3",)
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=False,
        # The whole payload already lives in the store; a body above this gets its own
        # object (the 30 KiB SubmitJob limit never sees either).
        inline_payload_limit=256 * 1024,
        array_jobs=True,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = _STATES
    reconcile_seconds: ClassVar[float] = 3.0
    confirm_poll_seconds: ClassVar[float] = 1.0  # one round is a paid API call per 100 jobs
    # The job's container ends with its task, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "flushed"

    options: AwsBatchOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.store_url = self.options.payload_store or ""
        self.python = self.options.python
        self.submissions = 0  # SubmitJob calls (an array job counts once)
        self._client: Any = None
        self._tracked: dict[str, float] = {}  # handle -> when we submitted it
        self._keys: dict[str, str] = {}  # handle -> payload key in the store

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        _check_required(self.options)
        self._client = await asyncio.to_thread(_batch_client, self.options)
        if self.options.verify_on_start:
            try:
                queue = await self._describe_queue(str(self.options.job_queue))
            except Exception as exc:  # botocore's errors: unreachable, credentials, denied
                raise AwsBatchError(
                    f"cannot reach AWS Batch at {self._where()}: {exc}; check endpoint_url, "
                    "region and credentials (or set verify_on_start = false)"
                ) from exc
            if queue is None:
                raise AwsBatchError(
                    f"AWS Batch job queue {self.options.job_queue!r} does not exist at "
                    f"{self._where()}; create it or set executor_config.job_queue"
                )

    def _where(self) -> str:
        region = getattr(getattr(self._client, "meta", None), "region_name", "?")
        return self.options.endpoint_url or f"AWS Batch in {region}"

    async def _call(self, method: str, **kwargs: Any) -> Any:
        if self._client is None:
            raise AwsBatchError("the aws_batch adapter is not started")
        return await asyncio.to_thread(getattr(self._client, method), **kwargs)

    async def _describe_queue(self, queue: str) -> dict[str, Any] | None:
        found = (await self._call("describe_job_queues", jobQueues=[queue])).get("jobQueues", [])
        return found[0] if found else None

    # ------------------------------------------------------------ submit

    def _store(self) -> payload_mod.PayloadStore:
        return payload_mod.open_store(self.store_url)

    def _job_name(self, job: JobSpec) -> str:
        raw = f"wove-{job.idempotency_key}" if job.idempotency_key is not None else job.job_name
        name = self.safe_name(raw, max_len=128)
        return name if name[:1].isalnum() else f"w{name[:127]}"

    async def _submit_request(self, request: dict[str, Any], children: int = 0) -> str:
        """SubmitJob, shielded: if our caller gives up while the request is in flight, the
        job it may still create is stopped instead of running for nobody."""
        response = await undone_if_abandoned(
            self._call("submit_job", **request), lambda made: self._stop_stray(made, children))
        self.submissions += 1
        return str(response["jobId"])

    async def _stop_stray(self, response: dict[str, Any], children: int) -> None:
        job_id = str(response["jobId"])
        handles = [job_id, *(f"{job_id}:{index}" for index in range(children))]
        await asyncio.gather(*(self.cancel(handle) for handle in handles), return_exceptions=True)

    async def submit(self, job: JobSpec) -> str:
        name = self._job_name(job)
        key = self.safe_name(f"{job.run_id}-{job.attempt}", max_len=200) + ".payload"
        await asyncio.to_thread(self._store()._put, key, job.payload.encode("ascii"))
        ref = f"{self.store_url}#{key}"
        command = worker_command(self.python, "--payload-ref", ref)
        try:
            request = _submit_job_request(self.options_for(job), name, command)
            handle = await self._submit_request(request)
        except BaseException:
            await asyncio.shield(self._delete_keys([key]))
            raise
        self._track(handle, key)
        return handle

    async def submit_many(self, jobs: list[JobSpec]) -> list[str]:
        """Jobs with the same queue, definition and options become one array job (one
        SubmitJob); each child reads the payload of its index. Handles are child job ids
        (``<array job id>:<index>``)."""
        return await submit_grouped(
            jobs, lambda job: json.dumps(job.options, sort_keys=True, default=repr),
            self._submit_arrays)

    async def _submit_arrays(self, jobs: list[JobSpec]) -> list[str]:
        handles: list[str] = []
        for start in range(0, len(jobs), _ARRAY_MAX):
            chunk = jobs[start : start + _ARRAY_MAX]
            if len(chunk) == 1:  # an array job needs at least two children
                handles.append(await self.submit(chunk[0]))
            else:
                handles += await self._submit_array(chunk)
        return handles

    async def _submit_array(self, jobs: list[JobSpec]) -> list[str]:
        tag = self.safe_name(f"wove-{jobs[0].task_id}-a{uuid.uuid4().hex[:12]}", max_len=100)
        keys = [f"{tag}-{index}" for index in range(len(jobs))]
        store = self._store()
        puts = asyncio.Semaphore(16)

        async def put(key: str, job: JobSpec) -> None:
            async with puts:
                await asyncio.to_thread(store._put, key, job.payload.encode("ascii"))

        await asyncio.gather(*(put(key, job) for key, job in zip(keys, jobs, strict=True)))
        command = ["/bin/sh", "-c", _ARRAY_SCRIPT, self.python, f"{self.store_url}#{tag}"]
        name = tag if tag[:1].isalnum() else f"w{tag}"
        request = _submit_job_request(self.options_for(jobs[0]), name, command)
        request["arrayProperties"] = {"size": len(jobs)}
        try:
            job_id = await self._submit_request(request, children=len(jobs))
        except BaseException:
            await asyncio.shield(self._delete_keys(keys))
            raise
        handles = [f"{job_id}:{index}" for index in range(len(jobs))]
        for handle, key in zip(handles, keys, strict=True):
            self._track(handle, key)
        return handles

    def _track(self, handle: str, key: str) -> None:
        self._tracked[handle] = time.monotonic()
        self._keys[handle] = key

    # ------------------------------------------------------------ status, cancel

    async def _describe(self, handles: list[str]) -> dict[str, tuple[str, str, int | None]]:
        """``{job id: (status, statusReason, exit code)}``: one DescribeJobs call per 100
        ids."""
        chunks = [
            handles[i : i + _DESCRIBE_BATCH] for i in range(0, len(handles), _DESCRIBE_BATCH)
        ]
        answers = await asyncio.gather(*(self._call("describe_jobs", jobs=c) for c in chunks))
        return {
            str(described["jobId"]): (
                str(described.get("status", "")), str(described.get("statusReason") or ""),
                _exit_code(described),
            )
            for answer in answers
            for described in answer.get("jobs", [])
        }

    def _state_of(self, status: str, reason: str, exit_code: int | None) -> JobState:
        if status == "FAILED" and reason.startswith(CANCEL_REASON):
            return JobState.CANCELLED
        if status == "FAILED" and exit_code == EXIT_PAYLOAD_REFUSED:
            return JobState.REFUSED  # the transport fails the run with PayloadError
        return self.map_state(status)

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        now = time.monotonic()
        for handle in handles:
            self._tracked.setdefault(handle, now)
        table = await self._describe(list(handles))
        states: dict[str, JobState] = {}
        for handle in handles:
            found = table.get(handle)
            if found is not None:
                states[handle] = self._state_of(*found)
            else:
                # DescribeJobs is eventually consistent right after SubmitJob.
                recent = now - self._tracked.get(handle, 0.0) < 30.0
                states[handle] = JobState.UNKNOWN if recent else JobState.GONE
        return states

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        described = (await self._call("describe_jobs", jobs=[handle])).get("jobs", [])
        status = str(described[0].get("status", "")) if described else ""
        if status in _FINISHED:
            return
        if status in _QUEUED:
            await self._call("cancel_job", jobId=handle, reason=CANCEL_REASON)
        if running and status not in _FINISHED:
            # Also for a job we saw queued: it may have started since, and cancel_job is a
            # no-op on a started job.
            await self._call("terminate_job", jobId=handle, reason=CANCEL_REASON)

    async def _delete_keys(self, keys: list[str]) -> None:
        store = self._store()
        await asyncio.gather(*(asyncio.to_thread(store.discard, [key]) for key in keys))

    async def release(self, handle: str) -> None:
        self._tracked.pop(handle, None)
        key = self._keys.pop(handle, None)
        if key is not None:
            await self._delete_keys([key])

    async def detach(self, handle: str) -> None:
        # The job may still need its payload object: leave it (an S3 lifecycle rule on
        # the prefix expires leftovers).
        self._tracked.pop(handle, None)
        self._keys.pop(handle, None)

    async def aclose(self) -> None:
        self._tracked.clear()
        self._keys.clear()

    async def doctor(self) -> list[Row]:
        rows: list[Row] = []
        queue_name = str(self.options.job_queue)
        try:
            started = time.perf_counter()
            queue = await self._describe_queue(queue_name)
            rows.append(("AWS Batch endpoint reachable", True,
                         f"{self._where()} ({(time.perf_counter() - started) * 1000:.0f} ms)"))
        except Exception as exc:  # every failure is a row
            rows.append(("AWS Batch endpoint reachable", False,
                         f"{self._where()}: {exc}; check endpoint_url, region and credentials"))
            return rows
        if queue is None:
            rows.append((f"job queue '{queue_name}'", False,
                         "does not exist: create it (aws batch create-job-queue) or fix job_queue"))
        else:
            healthy = queue.get("state") == "ENABLED" and queue.get("status") == "VALID"
            rows.append((f"job queue '{queue_name}'", healthy,
                         f"state {queue.get('state')}, status {queue.get('status')}"
                         + ("" if healthy else f": {queue.get('statusReason', '')}; enable it "
                            "(aws batch update-job-queue --state ENABLED)")))
            rows.extend(await self._compute_rows(queue))
        rows.append(await self._definition_row())
        rows.append(await store_row(self.store_url, "the jobs read them"))
        return rows

    async def _compute_rows(self, queue: dict[str, Any]) -> list[Row]:
        arns = [str(o["computeEnvironment"]) for o in queue.get("computeEnvironmentOrder", [])]
        if not arns:
            return [("compute environment", False, "the queue has none; attach one")]
        found = (await self._call("describe_compute_environments", computeEnvironments=arns))
        envs = found.get("computeEnvironments", [])
        usable = [e for e in envs if e.get("state") == "ENABLED" and e.get("status") == "VALID"]
        names = ", ".join(f"{e.get('computeEnvironmentName')} {e.get('state')}/{e.get('status')}"
                          for e in envs)
        return [("compute environment VALID and ENABLED", bool(usable), names or "none found")]

    async def _definition_row(self) -> Row:
        definition = str(self.options.job_definition)
        label = f"job definition '{definition}'"
        try:
            if definition.startswith("arn:") or ":" in definition:
                found = await self._call("describe_job_definitions", jobDefinitions=[definition])
            else:
                found = await self._call(
                    "describe_job_definitions", jobDefinitionName=definition, status="ACTIVE"
                )
        except Exception as exc:
            return (label, False, str(exc))
        active = [d for d in found.get("jobDefinitions", []) if d.get("status") == "ACTIVE"]
        if not active:
            return (label, False,
                    "no ACTIVE revision: register it (aws batch register-job-definition)")
        latest = max(active, key=lambda d: int(d.get("revision", 0)))
        image = (latest.get("containerProperties") or {}).get("image", "?")
        return (label, True, f"revision {latest.get('revision')}, image {image} "
                             "(it must have wove-adapters installed)")


def _exit_code(described: dict[str, Any]) -> int | None:
    """A stopped job's container exit code (DescribeJobs: the job's, else its last
    attempt's), None while it has none."""
    code = (described.get("container") or {}).get("exitCode")
    if code is None and described.get("attempts"):
        code = (described["attempts"][-1].get("container") or {}).get("exitCode")
    return int(code) if isinstance(code, int) else None


def _check_required(options: AwsBatchOptions) -> None:
    if not options.job_queue or not options.job_definition:
        raise AwsBatchError(
            "aws_batch needs executor_config.job_queue and executor_config.job_definition "
            "(the name or ARN of an existing Batch job queue and job definition)"
        )
    if not options.payload_store:
        raise AwsBatchError(
            "aws_batch needs executor_config.payload_store, a store the jobs can read, "
            "e.g. 's3://my-bucket/wove-payloads' (payloads never travel inside SubmitJob)"
        )


def _batch_client(options: AwsBatchOptions) -> Any:
    """Blocking: the boto3 Batch client (one per adapter), retries in standard mode."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        region_name=options.region or options.region_name,
        profile_name=options.profile,
    )
    if session.region_name is None:
        raise AwsBatchError(
            "no AWS region: set executor_config.region or AWS_DEFAULT_REGION"
        )
    return session.client(
        "batch",
        endpoint_url=options.endpoint_url,
        config=Config(
            max_pool_connections=options.max_pool_connections,
            retries={"mode": "standard", "max_attempts": options.max_attempts},
        ),
    )


def _submit_job_request(options: dict[str, Any], name: str, command: list[str]) -> dict[str, Any]:
    """SubmitJob arguments: queue, definition and pass-through options, our command."""
    overrides = copy.deepcopy(dict(options.get("container_overrides") or {}))
    environment = list(overrides.get("environment") or [])
    environment += [
        {"name": str(k), "value": str(v)}
        for k, v in (options.get("environment") or {}).items()
    ]
    if environment:
        overrides["environment"] = environment
    overrides["command"] = command
    request: dict[str, Any] = {
        "jobName": name,
        "jobQueue": str(options["job_queue"]),
        "jobDefinition": str(options["job_definition"]),
        "containerOverrides": overrides,
    }
    timeout = options.get("timeout")
    if timeout:
        request["timeout"] = (
            dict(timeout)
            if isinstance(timeout, dict)
            else {"attemptDurationSeconds": int(timeout)}
        )
    for key, field in (
        ("retry_strategy", "retryStrategy"),
        ("parameters", "parameters"),
        ("tags", "tags"),
        ("propagate_tags", "propagateTags"),
        ("scheduling_priority", "schedulingPriorityOverride"),
        ("share_identifier", "shareIdentifier"),
    ):
        if options.get(key) not in (None, ""):
            request[field] = options[key]
    request.update(options.get("submit_options") or {})
    return request
