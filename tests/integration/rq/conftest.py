"""Fixtures for the rq tests: a per-session queue and a real ``rq worker`` process.

See ``rq_services`` for how workers are started, stopped (by PID) and cleaned up.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rq_services import REDIS_URL, RqWorker, cleanup_queue, require_redis


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_redis()
    return REDIS_URL


@pytest.fixture(scope="session")
def rq_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rq-workers")


@pytest.fixture(scope="session")
def rq_queue(redis_url: str) -> Iterator[str]:
    queue = f"wove-test-rq-{uuid.uuid4().hex[:8]}"
    yield queue
    cleanup_queue(queue)


@pytest.fixture(scope="session")
def rq_worker(rq_queue: str, rq_logs: Path) -> Iterator[RqWorker]:
    """One preloading forking worker on the session queue (``rq worker -w ...Worker``)."""
    worker = RqWorker(rq_queue, rq_logs).wait_ready()
    yield worker
    worker.stop()


@pytest.fixture
def rq_environment(rq_worker: RqWorker, redis_url: str) -> dict[str, Any]:
    return {
        "executor": "rq",
        "executor_config": {"redis_url": redis_url, "queue": rq_worker.queue},
    }
