"""Task logs come home from a real ``arq`` worker (docs/observability.md, "Logs"): from
payloads run in its threads beside each other (each run's records its own) and in the
payload processes of its warm pool, over the HTTP receiver and the Redis drop box."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from arq_services import REDIS_URL, ArqWorker, environment

from wove_adapters.integration.hub import Hub

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import task_logs as tl
from hubs import hub_factory

records = tl.records  # the fixture: what the caller emitted during the test


@pytest.fixture
def hub_with(arq_worker: ArqWorker) -> Iterator[Callable[..., Hub]]:
    with hub_factory("arq-logs") as make:

        def build(config: dict[str, Any] | None = None, **settings: Any) -> Hub:
            return make({**environment(**(config or {})), **settings},
                        name=f"arq-logs-{uuid.uuid4().hex[:8]}")

        yield build


@pytest.mark.parametrize(("isolation", "return_path"),
                         [("thread", "http"), ("thread", "redis"), ("process", "http")])
def test_records_arrive_with_their_attributes(
    hub_with: Callable[..., Hub], records: tl.Collected, isolation: str, return_path: str
) -> None:
    """In the worker's threads (the default) and in payload processes of its warm pool
    (``isolation = "process"``); over the HTTP receiver and the Redis drop box."""
    config = {"isolation": isolation, "return_path": return_path,
              "return_redis_url": REDIS_URL}
    hub = hub_with(config, task_logs="INFO")
    tl.chatty_arrives(hub, records, 5)


def test_concurrent_runs_keep_their_own_records(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    """The worker runs several payloads at once, each in a thread: every record is its
    own run's (a mapped call, one run id per item, both records of an item on it)."""
    hub = hub_with(task_logs="INFO", map_chunk_size=0)
    assert hub.map(tl.item, range(12)) == list(range(12))
    tl.one_run_per_item(records, 12)


def test_off_means_none(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    tl.nothing_arrives(hub_with(), records)
