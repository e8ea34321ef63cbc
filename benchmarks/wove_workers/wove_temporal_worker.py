"""The Temporal worker of ``bench_wove_temporal.py``: ``temporal_test_worker``'s workflows
and activities (ours through ``run_worker``, the native ``user.Increment``) plus what wove
2.0.3's temporal adapter needs on the worker side. wove only calls
``client.start_workflow(<workflow>, payload, id=..., task_queue=...)``; the workflow is
the user's to write. The natural one (a workflow cannot do I/O itself) runs the payload
in one activity: ``wove.integrations.worker.arun(payload)`` runs the callable and POSTs
the result to the caller's callback server.

    python -m wove_temporal_worker --address A --task-queue Q [--max-concurrent N]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from datetime import timedelta
from typing import Any

from temporal_test_worker import OWN_ACTIVITIES, OWN_WORKFLOWS  # tests/integration/temporal
from temporalio import activity, workflow
from temporalio.client import Client

from wove_adapters.adapters.temporal import exit_now, run_worker


@activity.defn(name="wove.run_backend_payload")
async def wove_run_backend_payload(payload: dict[str, Any]) -> None:
    from wove.integrations.worker import arun

    await arun(payload)


@workflow.defn(name="wove.RunBackendPayload", sandboxed=False)
class WoveRunBackendPayload:
    @workflow.run
    async def run(self, payload: dict[str, Any]) -> None:
        await workflow.execute_activity(
            "wove.run_backend_payload", payload, start_to_close_timeout=timedelta(seconds=60)
        )


async def serve(options: argparse.Namespace) -> None:
    client = await Client.connect(options.address)
    running = asyncio.ensure_future(run_worker(
        client, options.task_queue,
        max_concurrent_activities=options.max_concurrent,
        workflows=[*OWN_WORKFLOWS, WoveRunBackendPayload],
        activities=[*OWN_ACTIVITIES, wove_run_backend_payload],
    ))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    running.cancel()
    try:
        await running
    except asyncio.CancelledError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--max-concurrent", type=int, default=100)
    asyncio.run(serve(parser.parse_args()))
    return exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
