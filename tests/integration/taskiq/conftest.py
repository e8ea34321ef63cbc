"""Fixtures: a real ``taskiq worker`` process on a queue of its own, for the session.

Redis must be running on 127.0.0.1:6379; if it is not, every test here fails and says how
to start it. The worker is started with the system's own CLI
(``python -m taskiq worker taskiq_worker_app:broker``), stopped by its PID, and its queue
and keys are deleted afterwards (never FLUSHDB: Redis is shared).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from taskiq_fixtures import TaskiqWorker, require_redis, start_worker, stop_worker


@pytest.fixture(scope="session")
def redis_available() -> None:
    require_redis()


@pytest.fixture(scope="session")
def taskiq_worker(
    redis_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TaskiqWorker]:
    queue = f"wove-test-taskiq-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("taskiq") / "worker.log"
    worker = start_worker(queue, log)
    yield worker
    stop_worker(worker)
