"""Fixtures of the fault suite (see tests/support/faults.py for the harness and
docs/faults.md for what each scenario proves).

Every process a scenario starts (private redis-servers, rq, arq, taskiq and dask workers, caller
programs) is registered here and stopped by PID at the end of the test, whatever
happened. Shared services (Redis 6379, PostgreSQL 5432) are used only under this test's
own key prefix or table, removed afterwards; a missing one fails the test with the
command that starts it.
"""

from __future__ import annotations

import itertools
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "support"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import faults  # noqa: E402  (tests/support, put on sys.path just above)
import hubs  # noqa: E402
import shared_servers  # noqa: E402


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The session's table: one row per scenario checked (docs/faults.md keeps one)."""
    if faults.RESULTS:
        terminalreporter.write_sep("=", "fault suite counts")
        terminalreporter.write_line(faults.table(faults.RESULTS))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., faults.RedisServer]]:
    """``private_redis(aof=False)``: a started redis-server of this test's own."""
    numbers = itertools.count()
    with faults.each_stopped() as keep:
        yield lambda *, aof=False: keep(
            faults.RedisServer(tmp_path / f"redis-{next(numbers)}", aof=aof)).start()


@pytest.fixture
def caller(tmp_path: Path) -> Iterator[Callable[..., faults.Caller]]:
    """``caller(body, params)``: a caller program, not started yet; stopped at teardown."""
    with faults.each_stopped() as keep:
        yield lambda body, params=None, **kwargs: keep(
            faults.Caller(tmp_path, body, params, **kwargs))


@pytest.fixture
def rq_worker(tmp_path: Path) -> Iterator[Callable[..., faults.RqWorkerProcess]]:
    """``rq_worker(redis_url, queue)``: a registered ``rq worker``; stopped at teardown."""
    with faults.each_stopped() as keep:
        yield lambda redis_url, queue: keep(
            faults.RqWorkerProcess(redis_url, queue, tmp_path)).wait_ready()


@pytest.fixture
def arq_worker(tmp_path: Path) -> Iterator[Callable[..., faults.ArqWorkerProcess]]:
    """``arq_worker(redis_url, queue)``: a started ``arq`` worker; stopped at teardown."""
    with faults.each_stopped() as keep:
        yield lambda redis_url, queue: keep(
            faults.ArqWorkerProcess(redis_url, queue, tmp_path)).wait_ready()


@pytest.fixture
def taskiq_worker(tmp_path: Path) -> Iterator[Callable[..., faults.TaskiqWorkerProcess]]:
    """``taskiq_worker(redis_url, queue)``: a started ``taskiq worker``; stopped at teardown."""
    with faults.each_stopped() as keep:
        yield lambda redis_url, queue: keep(
            faults.TaskiqWorkerProcess(redis_url, queue, tmp_path)).wait_ready()


@pytest.fixture
def redis_ledger() -> Iterator[str]:
    """A Redis ledger URL on the shared server, under a key prefix of this test's own."""
    prefix = f"wove-faults:{uuid.uuid4().hex[:12]}:"
    with shared_servers.redis_ledger(prefix, suite="faults") as url:
        yield url


@pytest.fixture
def postgres_ledger() -> Iterator[str]:
    """A PostgreSQL ledger URL with a table of this test's own, dropped afterwards."""
    with shared_servers.postgres_ledger(f"wove_faults_{uuid.uuid4().hex[:12]}") as url:
        yield url


@pytest.fixture
def sqlite_ledger(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.fixture
def ledger_url(request: pytest.FixtureRequest) -> str:
    """Parametrize with ``indirect=True`` over "sqlite", "redis", "postgres"."""
    return str(request.getfixturevalue(f"{request.param}_ledger"))


@pytest.fixture
def hub_for() -> Iterator[Callable[..., Any]]:
    """``hub_for(definition, ledger=URL)``: a Hub with one environment, ``faults``. At
    teardown the hubs close and every shared dispatcher stops, so no worker pool, client
    or receiver outlives the test that made it."""
    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.environments import stop_all

    with hubs.hub_factory("faults") as make:
        yield make
    shared_loop.run_sync(stop_all(), 120)


@pytest.fixture
def dask_cluster(tmp_path: Path) -> Iterator[faults.DaskCluster]:
    cluster = faults.DaskCluster(tmp_path / "dask")
    try:
        yield cluster.start()
    finally:
        from wove_adapters.core import loop as shared_loop
        from wove_adapters.integration.environments import stop_all

        shared_loop.run_sync(stop_all(), 120)  # their clients would retry a stopped scheduler
        cluster.stop()

