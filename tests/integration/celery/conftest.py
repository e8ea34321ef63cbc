"""Real Celery workers for the Celery tests: one on a Redis broker, one on RabbitMQ.

Session scoped (a worker start costs seconds on a busy machine); each has its own queue
and Redis key prefix, is stopped by PID and has its keys and queue removed at the end.
A missing broker fails the tests with the command that starts it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from celery_services import CeleryService, running


@pytest.fixture(scope="session")
def redis_celery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryService]:
    yield from running("redis", tmp_path_factory.mktemp("celery-redis"))


@pytest.fixture(scope="session")
def amqp_celery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryService]:
    yield from running("amqp", tmp_path_factory.mktemp("celery-amqp"))


@pytest.fixture(scope="session")
def traced_celery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CeleryService, Path]]:
    """A Redis-broker worker whose prefork children export their spans to a file
    (``WOVE_ADAPTERS_TRACING_INIT``, tests/support/otel_spans.py): (service, spans file)."""
    support = Path(__file__).resolve().parents[2] / "support"
    sys.path.insert(0, str(support))
    from otel_spans import worker_env

    directory = tmp_path_factory.mktemp("celery-traced")
    spans = directory / "spans.jsonl"
    env = {k: v for k, v in worker_env(spans).items() if k != "PYTHONPATH"}
    for service in running("redis", directory, pythonpath=(str(support),), extra_env=env):
        yield service, spans
