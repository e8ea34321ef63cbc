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
import sys
from datetime import timedelta
from typing import Any

from temporal_test_worker import (  # tests/integration/temporal
    OWN_ACTIVITIES,
    OWN_WORKFLOWS,
    until_sigterm,
    worker_arguments,
)
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
    await until_sigterm(asyncio.ensure_future(run_worker(
        client, options.task_queue,
        max_concurrent_activities=options.max_concurrent,
        workflows=[*OWN_WORKFLOWS, WoveRunBackendPayload],
        activities=[*OWN_ACTIVITIES, wove_run_backend_payload],
    )))


def main() -> int:
    asyncio.run(serve(worker_arguments(max_concurrent=100).parse_args()))
    return exit_now(0)


if __name__ == "__main__":
    sys.exit(main())
