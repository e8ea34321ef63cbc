"""``temporal``: each run is one Temporal workflow that runs the payload in one activity.

Caller side (``TemporalAdapter``): ``start_workflow`` with the workflow id taken from the
idempotency key (one key, one execution: a second start attaches to the first and answers
with its recorded result), ``cancel`` through the workflow handle, ``status`` from
``describe()``. The way back is the callback receiver (default) or, with
``return_path: "native"``, the workflow's own result.

Worker side (``run_worker`` / ``workflows()`` + ``activities()``): a generic workflow and
activity any Temporal worker can host next to its own. The activity runs each payload in
its own process (forked from a zygote with ``wove_adapters`` imported, so a start costs
milliseconds) and sends Temporal heartbeats while it runs: a cancellation reaches the
activity on a heartbeat, the task process gets SIGTERM and reports ``task_cancelled``.

This module must not import ``temporalio`` at import time (``core`` never does, and
``wove-adapters`` works without the extra); the workflow and activity classes are built
on first use.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, ClassVar, NoReturn

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core import frames
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.worker.pool import ProcessPool

WORKFLOW_NAME = "wove_adapters.run"
ACTIVITY_NAME = "wove_adapters.run_payload"
DEFAULT_ADDRESS = "127.0.0.1:7233"
DEFAULT_TASK_QUEUE = "wove-adapters"
# Temporal refuses payloads above 2 MiB (blob size limit). The payload text is base64 of
# the signed envelope (4/3 of the body), so bodies above 1 MiB go to the payload store.
INLINE_LIMIT = 1024 * 1024
# A signed outcome above this is not put into the workflow result (callback path: the
# caller already has it; native path: the run fails with a clear message).
RESULT_LIMIT = 1536 * 1024

TASK_FAILED = "WoveTaskFailed"  # ApplicationError type of a workflow whose task raised
Ident = tuple[str, str, int]  # run_id, task_id, attempt

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
    extra = "temporal"
    required_modules = ("temporalio",)
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=True,
        native_result=True,
        status=True,
        requeue=True,
        detach=True,
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
    reconcile_seconds: ClassVar[float] = 2.0
    # Each payload runs in a task process that ends with it, having delivered or
    # recorded its outcome first.
    after_job: ClassVar[str] = "settled"

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.address = str(config.get("address") or DEFAULT_ADDRESS)
        self.namespace = str(config.get("namespace") or "default")
        self.task_queue = str(config.get("task_queue") or DEFAULT_TASK_QUEUE)
        self.native = config.get("return_path") == "native"
        self._client: Any = None
        # Runs whose outcome we read from Temporal (native path, or a key another run
        # holds): workflow id -> (follower task, run ident). ``_attached``: the latter.
        self._followers: dict[str, tuple[asyncio.Task[None], Ident]] = {}
        self._attached: set[str] = set()

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        from temporalio.client import Client

        api_key = self.config.get("api_key")
        if isinstance(api_key, str) and api_key.startswith("env:"):
            api_key = os.environ.get(api_key[4:])
        try:
            self._client = await asyncio.wait_for(
                Client.connect(
                    self.address,
                    namespace=self.namespace,
                    tls=bool(self.config.get("tls", False)),
                    api_key=api_key or None,
                ),
                float(self.config.get("connect_timeout", 10.0)),
            )
        except Exception as exc:
            raise ConnectionError(
                f"Environment '{self.environment}': cannot reach the Temporal server at "
                f"{self.address} (namespace {self.namespace!r}): "
                f"{exc or type(exc).__name__}; {START_HINT}"
            ) from exc

    async def aclose(self) -> None:
        for task, _ in self._followers.values():
            task.cancel()
        self._followers.clear()
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
        options = {**self.config, **job.options}
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

        options = {**self.config, **job.options}
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
        ident: Ident = (job.run_id, job.task_id, job.attempt)
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
            # Someone (another process, another host) holds this key: follow their run.
            self._attached.add(workflow_id)
            self._follow(workflow_id, self._client.get_workflow_handle(workflow_id), ident)
            return workflow_id
        if self.native:
            self._follow(workflow_id, handle, ident)
        return workflow_id

    # ------------------------------------------------------------ the native way back

    def _follow(self, workflow_id: str, handle: Any, ident: Ident) -> None:
        task = asyncio.get_running_loop().create_task(
            self._await_result(workflow_id, handle, ident)
        )
        self._followers[workflow_id] = (task, ident)

        def _forget(_: object) -> None:
            if self._followers.get(workflow_id, (None,))[0] is task:
                self._followers.pop(workflow_id, None)
                self._attached.discard(workflow_id)

        task.add_done_callback(_forget)

    async def _await_result(self, workflow_id: str, handle: Any, ident: Ident) -> None:
        from temporalio.client import WorkflowFailureError
        from temporalio.exceptions import is_cancelled_exception

        run_id, task_id, attempt = ident
        try:
            result = await handle.result()
        except asyncio.CancelledError:
            raise
        except WorkflowFailureError as exc:
            outcome = _failed_task_outcome(exc)
            if outcome is not None:
                self._emit(await asyncio.to_thread(_outcome_frame, outcome, *ident))
            elif is_cancelled_exception(exc.cause):
                self._emit(frames.event(
                    frames.TASK_CANCELLED, run_id, task_id, attempt,
                    reason=f"Temporal cancelled workflow {workflow_id}",
                ))
            else:
                self._emit(frames.event(
                    frames.TASK_LOST, run_id, task_id, attempt,
                    reason=f"Temporal workflow {workflow_id} ended without an outcome: "
                           f"{_describe_failure(exc)}",
                ))
            return
        except Exception as exc:  # a broken result stream loses the run
            self._emit(frames.event(
                frames.TASK_LOST, run_id, task_id, attempt,
                reason=f"following Temporal workflow {workflow_id} failed: {exc}",
            ))
            return
        self._emit(await asyncio.to_thread(_outcome_frame, result, run_id, task_id, attempt))

    def _emit(self, frame: dict[str, Any]) -> None:
        if self.emit is not None:
            self.emit(frame)

    # ------------------------------------------------------------ cancel, status

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        from temporalio.service import RPCError, RPCStatusCode

        if handle in self._attached:
            # Not ours to stop (another caller owns the key): stop following, confirmed.
            follower = self._followers.pop(handle, None)
            self._attached.discard(handle)
            if follower is None:
                return
            follower[0].cancel()
            run_id, task_id, attempt = follower[1]
            self._emit(frames.event(
                frames.TASK_CANCELLED, run_id, task_id, attempt,
                reason=f"stopped following workflow {handle} (owned by another run)",
            ))
            return
        try:
            await self._client.get_workflow_handle(handle).cancel()
        except RPCError as exc:
            if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
                raise  # the request failed; a closed or vanished workflow needs no cancel

    async def status(self, handle: str) -> JobState:
        from temporalio.service import RPCError, RPCStatusCode

        if handle in self._followers:
            # The follower owns this run's outcome and reports its end (result, cancel or
            # loss) itself; reconciling here too would race it.
            return JobState.UNKNOWN
        try:
            description = await self._client.get_workflow_handle(handle).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return JobState.GONE
            raise
        status = description.status
        return self.map_state(status.name if status is not None else None)

    async def detach(self, handle: str) -> None:
        follower = self._followers.pop(handle, None)
        self._attached.discard(handle)
        if follower is not None:
            follower[0].cancel()

    async def doctor(self) -> list[tuple[str, bool, str]]:
        from temporalio.api.enums.v1 import TaskQueueType
        from temporalio.api.taskqueue.v1 import TaskQueue
        from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

        rows: list[tuple[str, bool, str]] = [
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


def _outcome_frame(result: Any, run_id: str, task_id: str, attempt: int) -> dict[str, Any]:
    """The workflow's result as this run's terminal frame (verified before unpickling)."""
    from wove_adapters.core.codec import decode_outcome

    blob = (result or {}).get("outcome") if isinstance(result, dict) else None
    if blob:
        try:
            frame = decode_outcome(base64.b64decode(blob))
        except Exception as exc:  # a forged or broken outcome is an error
            return frames.error_event(run_id, task_id, exc, attempt=attempt, source="backend")
        frame.update(run_id=run_id, task_id=task_id, attempt=attempt)
        return frame
    summary = result if isinstance(result, dict) else {}
    if summary.get("outcome_size"):
        message = (
            f"the outcome ({summary['outcome_size']} bytes) is too large for Temporal's "
            f"native result path (limit {RESULT_LIMIT}); use return_path='http' for it"
        )
    elif summary.get("state") == "refused":
        message = (
            "the worker refused the payload (bad signature, unknown signing key or a "
            "missing body); see the worker's log"
        )
    else:
        message = "the Temporal workflow finished without an outcome"
    return frames.error_event(
        run_id, task_id, RuntimeError(message), attempt=attempt, source="backend"
    )


# ---------------------------------------------------------------- the worker side


def _retry_policy(spec: dict[str, Any] | None) -> Any:
    from temporalio.common import RetryPolicy

    spec = dict(spec or {})
    for name in ("initial_interval", "maximum_interval"):
        if spec.get(name) is not None:
            spec[name] = timedelta(seconds=float(spec[name]))
    return RetryPolicy(**spec)


_built: dict[str, Any] = {}  # the workflow and activities, decorated on first use
_lock = threading.Lock()


class WoveRunWorkflow:
    """Runs one wove-adapters payload in one activity; its result is the run's outcome.

    Plain here so importing this module needs no ``temporalio``; ``workflows()`` applies
    Temporal's decorators on first use (Temporal refuses classes defined in functions).
    Unsandboxed: it only schedules one activity (no user code, nothing
    non-deterministic), and the sandbox would re-import this module for every run."""

    async def run(self, request: dict[str, Any]) -> dict[str, Any]:
        from temporalio import workflow
        from temporalio.exceptions import ApplicationError
        from temporalio.workflow import ActivityCancellationType

        result: dict[str, Any] = await workflow.execute_activity(
            ACTIVITY_NAME,
            request,
            task_queue=request.get("activity_task_queue") or None,
            start_to_close_timeout=timedelta(seconds=request["start_to_close_timeout"]),
            heartbeat_timeout=timedelta(seconds=request["heartbeat_timeout"]),
            retry_policy=_retry_policy(request.get("retry_policy")),
            # CANCELED then means the task really stopped (its process exited).
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        if result.get("state") != "succeeded":
            # A task that raised fails its workflow: the key is released for a retry (as
            # the ledger releases it), and the outcome travels in the failure's details.
            raise ApplicationError(
                f"the task {result.get('state')}", result, type=TASK_FAILED, non_retryable=True
            )
        return result


def _workflow_class() -> type:
    with _lock:
        if "workflow" not in _built:
            from temporalio import workflow

            WoveRunWorkflow.run = workflow.run(WoveRunWorkflow.run)  # type: ignore[method-assign]
            workflow.defn(name=WORKFLOW_NAME, sandboxed=False)(WoveRunWorkflow)
            _built["workflow"] = WoveRunWorkflow
    return WoveRunWorkflow


def workflows() -> list[type]:
    """The workflow classes to add to a Temporal ``Worker(workflows=[...])``."""
    return [_workflow_class()]


def activities(*, kill_after: float = 10.0) -> list[Any]:
    """The activities to add to a Temporal ``Worker(activities=[...])``.

    The activity is async (no ``activity_executor`` needed); each payload runs in its own
    child process. ``kill_after``: seconds a cancelled task gets to stop after SIGTERM
    before SIGKILL."""
    key = f"activity:{kill_after}"
    with _lock:
        if key not in _built:
            from temporalio import activity

            @activity.defn(name=ACTIVITY_NAME)
            async def run_payload(request: dict[str, Any]) -> dict[str, Any]:
                return await _host_payload(request, kill_after=kill_after)

            _built[key] = run_payload
    return [_built[key]]


async def run_worker(
    client: Any,
    task_queue: str = DEFAULT_TASK_QUEUE,
    *,
    kill_after: float = 10.0,
    preload: Sequence[str] = (),
    **worker_kwargs: Any,
) -> None:
    """Run a Temporal worker that serves wove-adapters payloads on ``task_queue`` until
    cancelled. ``worker_kwargs`` go to ``temporalio.worker.Worker`` (``workflows`` and
    ``activities`` are added to ours; ``max_concurrent_activities`` bounds the tasks run
    at once). ``preload``: modules the task processes import once, up front."""
    from temporalio.worker import Worker

    worker_kwargs.setdefault("max_heartbeat_throttle_interval", timedelta(seconds=1))
    worker_kwargs.setdefault("graceful_shutdown_timeout", timedelta(seconds=5))
    own_workflows = list(worker_kwargs.pop("workflows", []))
    own_activities = list(worker_kwargs.pop("activities", []))
    await asyncio.to_thread(prepare_processes, preload)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[*workflows(), *own_workflows],
        activities=[*activities(kill_after=kill_after), *own_activities],
        **worker_kwargs,
    )
    await worker.run()


# ---------------------------------------------------------------- one process per payload


_pool: ProcessPool | None = None


def prepare_processes(preload: Sequence[str] = ()) -> ProcessPool:
    """The warm pool task processes fork from (``wove_adapters.worker.pool``), its zygote
    started now if it is not running (the first payload would start it). ``preload``:
    modules task processes import up front. No slot bound of its own: the worker's
    ``max_concurrent_activities`` bounds the tasks run at once."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ProcessPool(None, preload=preload)
        pool = _pool
    pool.prepare()
    return pool


async def _host_payload(request: dict[str, Any], *, kill_after: float) -> dict[str, Any]:
    """The activity body: run the payload in a task process, heartbeat to Temporal while
    it runs, pass a cancellation on as SIGTERM, return the process's outcome summary."""
    from temporalio import activity
    from temporalio.exceptions import ApplicationError

    pool = _pool if _pool is not None else await asyncio.to_thread(prepare_processes)
    run = pool.run(request["payload"], keep_outcome=True)
    interval = min(max(float(request.get("heartbeat_timeout") or 10.0) / 4, 0.05), 1.0)
    try:
        # The first heartbeat goes out after one interval, not at once: a short task then
        # costs the server no heartbeat write at all (cancellation of a queued activity
        # needs none; a running one hears of it on the next heartbeat's reply).
        while not await run.wait(interval):
            activity.heartbeat({"pid": run.pid})
    except asyncio.CancelledError:
        run.cancel(_stop_signal(activity.cancellation_details()), kill_after=kill_after)
        with contextlib.suppress(asyncio.CancelledError):
            await run.wait(kill_after + 1.0)
        raise
    outcome = await run
    if not outcome.report:
        raise ApplicationError(
            f"{outcome.notice or 'the task process died'}, without an outcome",
            type="WoveTaskProcessDied",
        )
    text = base64.b64encode(outcome.outcome).decode() if outcome.outcome else None
    if text is not None and len(text) > RESULT_LIMIT:
        return {"state": outcome.state, "outcome": None, "outcome_size": len(text)}
    return {"state": outcome.state, "outcome": text}


def _stop_signal(details: Any) -> int:
    """A cancel request: SIGTERM, and the task reports task_cancelled. Anything else (the
    worker shutting down, Temporal timed the activity out or forgot it): the run is lost,
    the process dies without a word and the caller's orphan policy decides."""
    requested = details is None or details.cancel_requested
    return signal.SIGTERM if requested else signal.SIGKILL


# ---------------------------------------------------------------- names and the CLI


def __getattr__(name: str) -> Any:
    """``run_payload`` (the activity), built on first access (lazy import)."""
    if name == "run_payload":
        return activities()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """``python -m wove_adapters.adapters.temporal``: a worker for wove-adapters payloads."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wove_adapters.adapters.temporal")
    parser.add_argument("--address", default=os.environ.get("TEMPORAL_ADDRESS", DEFAULT_ADDRESS))
    parser.add_argument("--namespace", default=os.environ.get("TEMPORAL_NAMESPACE", "default"))
    parser.add_argument("--task-queue", default=DEFAULT_TASK_QUEUE)
    parser.add_argument("--max-concurrent-activities", type=int, default=None)
    parser.add_argument("--preload", action="append", default=[],
                        help="a module task processes import up front (repeatable)")
    options = parser.parse_args(argv)

    async def _serve() -> None:
        from temporalio.client import Client

        client = await Client.connect(options.address, namespace=options.namespace)
        worker = asyncio.ensure_future(run_worker(
            client, options.task_queue, preload=options.preload,
            max_concurrent_activities=options.max_concurrent_activities,
        ))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"wove-adapters temporal worker: serving '{options.task_queue}' on "
              f"{options.address}", file=sys.stderr, flush=True)
        await asyncio.wait({worker, asyncio.ensure_future(stop.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        worker.cancel()  # the SDK shuts the worker down gracefully on cancel
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    asyncio.run(_serve())
    return exit_now(0)


def exit_now(code: int) -> NoReturn:
    """Leave without interpreter finalization: temporalio's Rust threads can crash a
    finalizing interpreter (temporalio/sdk-python#300) even after a clean shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's (one set of globals).
    from wove_adapters.adapters.temporal import main as _main

    sys.exit(_main())
