"""Fixtures for the arq tests: a real ``arq`` CLI worker on a per-session queue.

See ``arq_services`` for the Redis hygiene (database, prefixes, clean-up by prefix).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from arq_services import SESSION, ArqWorker, cleanup_session, require_redis


@pytest.fixture(scope="session")
def arq_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("arq-workers")


@pytest.fixture(scope="session")
def arq_session() -> Iterator[str]:
    require_redis()
    yield SESSION
    cleanup_session()


@pytest.fixture(scope="session")
def arq_worker(arq_session: str, arq_logs: Path) -> Iterator[ArqWorker]:
    """``arq arq_worker_settings.WorkerSettings``: 4 jobs at once, 10 ms polls, aborts on."""
    worker = ArqWorker(f"{arq_session}-main", arq_logs).start()
    yield worker
    worker.stop()


@pytest.fixture
def make_worker(arq_session: str, arq_logs: Path) -> Iterator[object]:
    """Extra workers on their own queues for one test, stopped by PID afterwards."""
    started: list[ArqWorker] = []

    def make(name: str, **kwargs: object) -> ArqWorker:
        worker = ArqWorker(f"{arq_session}-{name}", arq_logs, **kwargs)  # type: ignore[arg-type]
        started.append(worker)
        return worker

    yield make
    for worker in started:
        worker.kill()
