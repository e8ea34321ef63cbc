"""A user's own Temporal worker hosting wove-adapters' generic workflow and activity next to
its own workflows (``user.Greet``, ``user.Increment``) and activities.

    python -m temporal_test_worker --address 127.0.0.1:7233 --task-queue Q [--style own]

``--style helper`` (default) uses ``run_worker(client, task_queue, workflows=[...],
activities=[...])``; ``--style own`` builds ``temporalio.worker.Worker`` itself with
``workflows()`` and ``activities()``. Stops gracefully on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from wove_adapters.adapters.temporal import (
    activities,
    exit_now,
    prepare_processes,
    run_worker,
    workflows,
)


@activity.defn(name="user.greet")
async def greet(name: str) -> str:
    return f"hello {name}"


@workflow.defn(name="user.Greet", sandboxed=False)
class GreetWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        result: str = await workflow.execute_activity(
            "user.greet", name, start_to_close_timeout=timedelta(seconds=30)
        )
        return result


@activity.defn(name="user.increment")
async def increment(x: int) -> int:
    return x + 1


@workflow.defn(name="user.Increment", sandboxed=False)
class IncrementWorkflow:
    """The native baseline of ``benchmarks/bench_temporal.py``: one workflow, one activity."""

    @workflow.run
    async def run(self, x: int) -> int:
        result: int = await workflow.execute_activity(
            "user.increment", x, start_to_close_timeout=timedelta(seconds=30)
        )
        return result


OWN_WORKFLOWS: list[type] = [GreetWorkflow, IncrementWorkflow]
OWN_ACTIVITIES: list[Any] = [greet, increment]


async def serve(options: argparse.Namespace) -> None:
    client = await Client.connect(options.address)
    if options.style == "helper":
        running = asyncio.ensure_future(run_worker(
            client, options.task_queue,
            max_concurrent_activities=options.max_concurrent,
            workflows=OWN_WORKFLOWS, activities=OWN_ACTIVITIES,
        ))
    else:
        prepare_processes()
        worker = Worker(
            client,
            task_queue=options.task_queue,
            workflows=[*workflows(), *OWN_WORKFLOWS],
            activities=[*activities(), *OWN_ACTIVITIES],
            max_concurrent_activities=options.max_concurrent,
            max_heartbeat_throttle_interval=timedelta(seconds=1),
        )
        running = asyncio.ensure_future(worker.run())
    await until_sigterm(running)


async def until_sigterm(running: asyncio.Future[Any]) -> None:
    """Let the worker run until SIGTERM, then cancel it: a graceful stop (the benchmark's
    worker, ``benchmarks/wove_workers/wove_temporal_worker.py``, stops the same way)."""
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    running.cancel()
    try:
        await running
    except asyncio.CancelledError:
        pass


def worker_arguments(max_concurrent: int) -> argparse.ArgumentParser:
    """``--address``, ``--task-queue`` and ``--max-concurrent`` (activities at once)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--max-concurrent", type=int, default=max_concurrent)
    return parser


def main() -> int:
    parser = worker_arguments(max_concurrent=2)
    parser.add_argument("--style", choices=["helper", "own"], default="helper")
    asyncio.run(serve(parser.parse_args()))
    return exit_now(0)  # a clean stop; skip finalization (temporalio/sdk-python#300)


if __name__ == "__main__":
    sys.exit(main())
