"""``temporal``: each run is one Temporal workflow that runs the payload in one activity.

Caller side (``TemporalAdapter``): ``start_workflow`` with the workflow id taken from the
idempotency key (one key, one execution: a start that finds the id taken returns
``Following``, and the transport hands the run what that workflow recorded, read through
``outcomes``), ``cancel`` through the workflow handle, ``status`` from ``describe()``.
The way back is the callback receiver (default) or, with ``return_path: "native"``, the
workflow's own result, awaited through its handle. A worker that cannot verify a payload
signs and sends nothing: its workflow fails with the activity's summary ``refused``, which
``status`` reports as REFUSED (the native reader at once), and the run fails with a
PayloadError naming the key, never requeued.

Worker side (``run_worker`` / ``workflows()`` + ``activities()``, the module's command
line): ``wove_adapters.worker.temporal``, whose public names are importable from here too.

This module must not import ``temporalio`` at import time (``core`` never does, and
``wove-adapters`` works without the extra).
"""

from __future__ import annotations

import asyncio
import base64
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.callbacks.inbox import refusal_frame
from wove_adapters.core import frames
from wove_adapters.core.doctor import Row
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.signing import secret_text
from wove_adapters.core.transport import STATUS_CONCURRENCY
from wove_adapters.worker.temporal import (
    ACTIVITY_NAME,
    DEFAULT_ADDRESS,
    DEFAULT_TASK_QUEUE,
    RESULT_LIMIT,
    TASK_FAILED,
    WORKFLOW_NAME,
    WoveRunWorkflow,
    activities,
    exit_now,
    main,
    prepare_processes,
    run_worker,
    workflows,
)

__all__ = [
    "ACTIVITY_NAME", "DEFAULT_ADDRESS", "DEFAULT_TASK_QUEUE", "INLINE_LIMIT", "RESULT_LIMIT",
    "TASK_FAILED", "WORKFLOW_NAME", "TemporalAdapter", "TemporalOptions", "WoveRunWorkflow",
    "activities", "exit_now", "main", "prepare_processes", "run_worker", "workflows",
]

# Temporal refuses payloads above 2 MiB (blob size limit). The payload text is base64 of
# the signed envelope (4/3 of the body), so bodies above 1 MiB go to the payload store.
INLINE_LIMIT = 1024 * 1024

START_HINT = (
    "start one with `temporal server start-dev --ip 127.0.0.1` (the `temporal` CLI comes "
    "with `pip install 'wove-adapters[temporal]'`) or set executor_config['address']"
)


class TemporalOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``temporal`` (docs/adapters/temporal.md)."""

    address: str = DEFAULT_ADDRESS
    namespace: str = "default"
    task_queue: str = DEFAULT_TASK_QUEUE
    tls: bool = False
    api_key: str | None = None
    connect_timeout: float = 10.0
    # Activity and workflow options (also per task, in task_options).
    heartbeat_timeout: float = 10.0
    start_to_close_timeout: float | None = None
    retries: int | None = None
    retry_policy: dict[str, Any] | None = None
    activity_task_queue: str | None = None
    priority: int | None = None
    execution_timeout: float | None = None
    memo: dict[str, Any] | None = None
    summary: bool = True


class TemporalAdapter(BackendAdapter):
    name = "temporal"
    config_struct = TemporalOptions
    required_modules = ("temporalio",)
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=True,
        native_result=True,
        inline_payload_limit=INLINE_LIMIT,
    )
    # WorkflowExecutionStatus names. TERMINATED is a forced stop (an operator, or a
    # conflict policy): the job is over without a word from the worker.
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "RUNNING": JobState.RUNNING,
        "COMPLETED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "CANCELED": JobState.CANCELLED,
        "TERMINATED": JobState.CANCELLED,
        "TIMED_OUT": JobState.FAILED,
        "CONTINUED_AS_NEW": JobState.RUNNING,
    }
    # Each payload runs in a task process that ends with it, having delivered or
    # recorded its outcome first.
    after_job: ClassVar[str] = "settled"

    options: TemporalOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.address = self.options.address
        self.namespace = self.options.namespace
        self.task_queue = self.options.task_queue
        self._client: Any = None
        # Our own workflows whose result is the way back (native path): id -> its reader.
        self._readers: dict[str, asyncio.Task[None]] = {}

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        from temporalio.client import Client

        api_key = self.options.api_key
        if api_key:  # a literal, env:VAR or file:/path
            api_key = secret_text(api_key, option="api_key")
        try:
            self._client = await asyncio.wait_for(
                Client.connect(
                    self.address,
                    namespace=self.namespace,
                    tls=self.options.tls,
                    api_key=api_key or None,
                ),
                self.options.connect_timeout,
            )
        except Exception as exc:
            raise ConnectionError(
                f"Environment '{self.environment}': cannot reach the Temporal server at "
                f"{self.address} (namespace {self.namespace!r}): "
                f"{exc or type(exc).__name__}; {START_HINT}"
            ) from exc

    async def aclose(self) -> None:
        for task in self._readers.values():
            task.cancel()
        self._readers.clear()
        self._client = None  # the SDK's client holds no resources to release

    # ------------------------------------------------------------ submit

    def workflow_id(self, job: JobSpec) -> str:
        """The idempotency key when there is one (a requeued attempt gets a suffix: it is a
        deliberate second execution), else one id per run attempt."""
        if job.idempotency_key is not None:
            base = self.safe_name(f"wove-key-{job.idempotency_key}", allowed=r"A-Za-z0-9_\-.")
            return base if job.attempt == 1 else f"{base}.attempt{job.attempt}"
        return self.safe_name(f"wove-{job.run_id}-{job.attempt}", allowed=r"A-Za-z0-9_\-.")

    def request(self, job: JobSpec) -> dict[str, Any]:
        """The workflow's input: the payload plus the activity options it runs it with."""
        options = self.options_for(job)
        timeout = job.delivery.get("delivery_timeout")
        start_to_close = options.get("start_to_close_timeout") or (
            float(timeout) + 60.0 if timeout else 7 * 24 * 3600.0
        )
        retry = dict(options.get("retry_policy") or {})
        if "retries" in options and "maximum_attempts" not in retry:
            retry["maximum_attempts"] = int(options["retries"]) + 1
        retry.setdefault("maximum_attempts", 1)  # our orphan policy owns requeue
        return {
            "payload": job.payload,
            "run_id": job.run_id,
            "attempt": job.attempt,
            "heartbeat_timeout": float(options.get("heartbeat_timeout") or 10.0),
            "start_to_close_timeout": float(start_to_close),
            "retry_policy": retry,
            "activity_task_queue": options.get("activity_task_queue"),
            "native": self.native,
        }

    async def submit(self, job: JobSpec) -> str:
        from temporalio.common import Priority, WorkflowIDConflictPolicy, WorkflowIDReusePolicy
        from temporalio.exceptions import WorkflowAlreadyStartedError

        options = self.options_for(job)
        workflow_id = self.workflow_id(job)
        extra: dict[str, Any] = {}
        if options.get("priority") is not None:
            extra["priority"] = Priority(priority_key=int(options["priority"]))
        if options.get("execution_timeout"):
            extra["execution_timeout"] = timedelta(seconds=float(options["execution_timeout"]))
        if options.get("memo"):
            extra["memo"] = dict(options["memo"])
        if options.get("summary", True):
            extra["static_summary"] = f"{job.task_id} (run {job.run_id}, attempt {job.attempt})"
        try:
            handle = await self._client.start_workflow(
                WORKFLOW_NAME,
                self.request(job),
                id=workflow_id,
                task_queue=str(options.get("task_queue") or self.task_queue),
                # A closed run's id stays taken while it completed (its result answers a
                # repeat); a failed, cancelled or terminated one may run again.
                id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE_FAILED_ONLY,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                **extra,
            )
        except WorkflowAlreadyStartedError:
            # Someone (another process, another host) holds this key: the transport
            # follows their workflow (outcomes).
            return Following(workflow_id)
        if self.native:
            reader = asyncio.get_running_loop().create_task(self._read_result(handle, job))
            self._readers[workflow_id] = reader
            reader.add_done_callback(lambda _: self._forget_reader(workflow_id, reader))
        return workflow_id

    # ------------------------------------------------------------ the way back from Temporal

    async def _read_result(self, handle: Any, job: JobSpec) -> None:
        """Our own workflow's result (``return_path: "native"``) as the run's terminal
        event: the outcome it recorded, its cancellation, or its loss."""
        try:
            found = await _settled(handle)
        except Exception as exc:  # a broken result stream loses the run
            found = _Ended(f"following Temporal workflow {handle.id} failed: {exc}")
        if isinstance(found, _Refused):  # the worker signed and sent nothing
            self.report(refusal_frame(self.name, job, self.config))
            return
        if isinstance(found, bytes):
            from wove_adapters.core.codec import decode_outcome

            try:  # verified before unpickling
                frame = await asyncio.to_thread(decode_outcome, found, job.run_id)
            except Exception as exc:  # a forged or broken outcome is an error
                found = exc
        if not isinstance(found, bytes):
            frame = _end_frame(found, job, handle.id)
        self.report(frame)

    def _forget_reader(self, workflow_id: str, reader: asyncio.Task[None]) -> None:
        if self._readers.get(workflow_id) is reader:
            del self._readers[workflow_id]

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """What another caller's workflows (``Following``) recorded, for those that
        completed or failed: the signed outcome, or why there is none. A cancelled or
        terminated one is status_many's CANCELLED (the transport cancels its followers).
        One ``describe`` per workflow (Temporal has no batch of them), a bounded number
        at a time, then the result of each closed one."""
        from temporalio.service import RPCError

        bound = asyncio.Semaphore(STATUS_CONCURRENCY)

        async def closed(workflow_id: str) -> bytes | Exception | None:
            handle = self._client.get_workflow_handle(workflow_id)
            try:
                async with bound:
                    status = (await handle.describe()).status
                    state = self.map_state(status.name if status is not None else None)
                    if state not in (JobState.SUCCEEDED, JobState.FAILED):
                        return None  # running; a cancelled one status_many reports
                    return await _settled(handle)
            except RPCError:  # asked again next round; a vanished one status_many reports
                return None
            except Exception as exc:  # a closed workflow whose result cannot be read
                return exc

        found = await asyncio.gather(*(closed(handle) for handle in handles))
        return {
            handle: outcome
            for handle, outcome in zip(handles, found, strict=True)
            if outcome is not None
        }

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        from temporalio.service import RPCError, RPCStatusCode

        try:
            await self._client.get_workflow_handle(handle).cancel()
        except RPCError as exc:
            if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise  # the request failed; a closed or vanished workflow needs no cancel

    async def status(self, handle: str) -> JobState:
        from temporalio.service import RPCError, RPCStatusCode

        if handle in self._readers:
            # Its reader owns this run's outcome and reports its end (result, cancel or
            # loss) itself; reconciling here too would race it.
            return JobState.UNKNOWN
        handle_of = self._client.get_workflow_handle(handle)
        try:
            description = await handle_of.describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return JobState.GONE
            raise
        status = description.status
        state = self.map_state(status.name if status is not None else None)
        if state is JobState.FAILED and await _was_refused(handle_of):
            return JobState.REFUSED  # the transport fails the run with PayloadError
        return state

    async def detach(self, handle: str) -> None:
        reader = self._readers.pop(handle, None)
        if reader is not None:
            reader.cancel()

    async def doctor(self) -> list[Row]:
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        rows: list[Row] = [
            ("Temporal server", self._client is not None, f"{self.address} ({self.namespace})")
        ]
        for kind, queue_type in (
            ("workflow", TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            ("activity", TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
        ):
            try:
                response = await self._client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=self.namespace,
                        task_queue=TaskQueue(name=self.task_queue),
                        task_queue_type=queue_type,
                    )
                )
                pollers = [poller.identity for poller in response.pollers]
                rows.append((
                    f"a worker polls '{self.task_queue}' ({kind} tasks)",
                    bool(pollers),
                    ", ".join(pollers[:3]) or (
                        "no poller: run `python -m wove_adapters.adapters.temporal "
                        f"--address {self.address} --task-queue {self.task_queue}` or add "
                        "workflows()/activities() to your worker"
                    ),
                ))
            except Exception as exc:  # a failed check is a row
                rows.append((f"task queue '{self.task_queue}'", False, str(exc)))
        return rows


def _failed_task_outcome(exc: Any) -> dict[str, Any] | None:
    """The outcome summary a workflow failed with because its task raised, else None."""
    from temporalio.exceptions import ApplicationError

    cause = exc.cause
    if isinstance(cause, ApplicationError) and cause.type == TASK_FAILED and cause.details:
        details = cause.details[0]
        return details if isinstance(details, dict) else None
    return None


def _describe_failure(exc: BaseException) -> str:
    parts: list[str] = []
    cause: BaseException | None = exc
    while cause is not None and len(parts) < 4:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return " <- ".join(parts[1:] or parts)


class _Ended(RuntimeError):
    """A workflow that ended without its task's word (failed, terminated, timed out)."""


class _Refused(PayloadError):
    """A workflow whose worker refused the payload (it did not verify there): the
    worker signed and sent nothing; the activity's summary says ``refused``."""


async def _settled(handle: Any) -> bytes | Exception | None:
    """How a workflow ended, once it has: the signed outcome its activity recorded (in the
    result, or in the failure of a task that raised), None when it was cancelled, else an
    exception saying why there is no outcome."""
    from temporalio.client import WorkflowFailureError
    from temporalio.exceptions import is_cancelled_exception

    try:
        return _recorded(await handle.result())
    except WorkflowFailureError as exc:
        summary = _failed_task_outcome(exc)
        if summary is not None:
            return _recorded(summary)
        if is_cancelled_exception(exc.cause):
            return None
        return _Ended(f"Temporal workflow {handle.id} ended without an outcome: "
                      f"{_describe_failure(exc)}")


async def _was_refused(handle: Any) -> bool:
    """Whether a failed workflow failed because its worker refused the payload (one more
    request, for failed workflows only: the failure is not in ``describe()``)."""
    try:
        return isinstance(await _settled(handle), _Refused)
    except Exception:  # unreadable now: failed, as describe() said
        return False


def _recorded(summary: Any) -> bytes | Exception:
    """The signed outcome in the activity's summary, else why it holds none."""
    summary = summary if isinstance(summary, dict) else {}
    if summary.get("outcome"):
        try:
            return base64.b64decode(summary["outcome"])
        except ValueError as exc:  # a broken record is the run's error
            return exc
    if summary.get("outcome_size"):
        message = (
            f"the outcome ({summary['outcome_size']} bytes) is too large for Temporal's "
            f"native result path (limit {RESULT_LIMIT}); use return_path='http' for it"
        )
    elif summary.get("state") == "refused":
        return _Refused(
            "the Temporal worker refused the payload: it did not verify there (usually the "
            "worker does not hold the signing key); see the worker's log"
        )
    else:
        message = "the Temporal workflow finished without an outcome"
    return RuntimeError(message)


def _end_frame(found: Exception | None, job: JobSpec, workflow_id: str) -> dict[str, Any]:
    """The terminal event of our own workflow when it left no outcome to verify."""
    if found is None:
        return frames.event_of(job, frames.TASK_CANCELLED,
                         reason=f"Temporal cancelled workflow {workflow_id}")
    if isinstance(found, _Ended):
        return frames.event_of(job, frames.TASK_LOST, reason=str(found))
    return frames.error_event(job.run_id, job.task_id, found, attempt=job.attempt,
                              source="backend")


def __getattr__(name: str) -> Any:
    """``run_payload`` (the activity), built on first access by the worker side."""
    if name == "run_payload":
        return activities()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
