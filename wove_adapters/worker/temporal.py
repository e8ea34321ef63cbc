"""The Temporal worker side of the ``temporal`` adapter: a generic workflow and activity
any Temporal worker can host next to its own (``workflows()`` + ``activities()``), a
ready-made worker (``run_worker``) and its command line
(``python -m wove_adapters.adapters.temporal``).

The workflow runs one activity; the activity runs the payload in a task process from the
shared warm pool (``worker.pool``: forked from a zygote with ``wove_adapters`` imported, so
a start costs milliseconds) and sends Temporal heartbeats while it runs: a cancellation
reaches the activity on a heartbeat, the task process gets SIGTERM and reports
``task_cancelled``. The activity's result carries the signed outcome the pool's payload
process kept (``worker.pool.run_payload``); nothing here builds or signs an event. A
payload that does not verify gets none: the summary says ``refused`` and the workflow
fails with it, which is how the caller learns of it.

This module must not import ``temporalio`` at import time (the caller's adapter module
imports its names, and ``wove-adapters`` works without the extra); the workflow and
activity are decorated on first use. It never imports the caller's side.
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
from typing import Any, NoReturn

from wove_adapters.worker.pool import ProcessPool

WORKFLOW_NAME = "wove_adapters.run"
ACTIVITY_NAME = "wove_adapters.run_payload"
DEFAULT_ADDRESS = "127.0.0.1:7233"
DEFAULT_TASK_QUEUE = "wove-adapters"
# A signed outcome above this is not put into the workflow result (callback path: the
# caller already has it; native path: the run fails with a clear message).
RESULT_LIMIT = 1536 * 1024
TASK_FAILED = "WoveTaskFailed"  # ApplicationError type of a workflow whose task raised


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
            # So does a refused payload ("refused", no outcome): the only report of it.
            message = ("the worker refused the payload" if result.get("state") == "refused"
                       else f"the task {result.get('state')}")
            raise ApplicationError(message, result, type=TASK_FAILED, non_retryable=True)
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
