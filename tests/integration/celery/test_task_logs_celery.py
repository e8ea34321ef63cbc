"""Task logs come home from a real Celery worker (docs/observability.md, "Logs"): a
prefork child's records (plain ``logging`` and Celery's own task loggers, which do not
propagate to the root) and its printed lines (which Celery redirects into its logging)
arrive in the caller under ``wove_adapters.task`` with their attributes, once each; a
chunked ``Hub.map`` keeps every run's records on its own run id."""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import task_logs as tl
from celery_services import CeleryService
from hubs import hub_factory

from wove_adapters.core import loop as shared_loop
from wove_adapters.integration.hub import Hub
from wove_adapters.worker import tasklogs as worker_logs

records = tl.records  # the fixture: what the caller emitted during the test


@pytest.fixture
def hub_with(redis_celery: CeleryService, tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """A Hub on the Redis-broker worker, an environment name of its own per hub (its
    dispatcher's stats and ledger rows are its own)."""
    with hub_factory("c") as make:

        def build(**settings: Any) -> Hub:
            definition = {"executor": "celery", "executor_config": redis_celery.executor_config,
                          **settings}
            return make(definition, name=f"celery-logs-{uuid.uuid4().hex[:8]}",
                        ledger=f"sqlite:///{tmp_path}/runs-{uuid.uuid4().hex[:6]}.db")

        yield build


def celery_task_logger(n: int) -> int:
    """Celery's own task logger: its records stop at ``celery.task``."""
    from celery.utils.log import get_task_logger

    get_task_logger("tests.celery_task").warning("celery task logger %d", n)
    return os.getpid()


def test_records_arrive_with_their_attributes(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO")
    tl.chatty_arrives(hub, records, 4)
    # Celery's task loggers do not propagate to the root: their records come too.
    future = hub.submit(celery_task_logger, 4)
    future.result(timeout=60)
    (record,) = records.of("tests.celery_task")
    assert record.getMessage() == "celery task logger 4"
    assert record.run_id == future.run_id  # type: ignore[attr-defined]


def test_level_filtering_and_off(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    hub = hub_with(task_logs="ERROR")
    hub.run(tl.chatty, 1)
    assert [r.getMessage() for r in records.of("tests.chatty")] == ["failed 1"]
    records.records.clear()
    tl.nothing_arrives(hub_with(), records)


def test_printed_lines_come_once(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    """Celery redirects a prefork child's stdout into its logging: the line is captured
    as output, not a second time as a record of ``celery.redirected``."""
    hub = hub_with(task_logs="INFO", task_output=True)
    hub.run(tl.printer, 9)
    assert [r.getMessage() for r in records.of("stdout")] == ["out 9", "unfinished 9"]
    assert [r.getMessage() for r in records.of("stderr")] == ["err 9"]
    assert [r.getMessage() for r in records.of("tests.printer")] == ["record 9"]
    assert records.of("celery.redirected") == []


def test_rate_limit_and_size_cap(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    hub = hub_with(task_logs="INFO")
    hub.run(tl.flood, 600)
    kept = records.of("tests.flood")
    (summary,) = records.of("wove_adapters")
    assert summary.dropped_records > 0  # type: ignore[attr-defined]
    assert len(kept) + summary.dropped_records == 600  # type: ignore[attr-defined]
    records.records.clear()
    hub.run(tl.big, 9000)
    (record,) = records.of("tests.big")
    assert record.getMessage() == "y" * worker_logs.MAX_MESSAGE + "... [808 bytes cut]"


def test_a_chunked_map_keeps_each_runs_records_on_its_run(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO", map_chunk_size=8)
    environment = hub.config.default_environment
    dispatcher = hub.dispatcher(environment)
    transport: Any = dispatcher.transport
    chunks_before = transport.stats.get("chunk_submissions", 0)
    assert hub.map(tl.item, range(40)) == list(range(40))
    assert transport.stats["chunk_submissions"] - chunks_before >= 5, "the runs went alone"
    ids = tl.one_run_per_item(records, 40)
    # And those are the mapped call's own runs, as the ledger knows them.
    ledger_runs = shared_loop.run_sync(
        dispatcher.ledger.list_runs(limit=100, environment=environment))
    assert ids == {run.run_id for run in ledger_runs if run.task_id == "item"}
    assert {r.levelno for r in records.of("tests.item")} == {logging.WARNING}
