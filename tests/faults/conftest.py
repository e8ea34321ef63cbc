"""Fixtures of the fault suite (see tests/support/faults.py for the harness and
docs/faults.md for what each scenario proves).

Every process a scenario starts (private redis-servers, rq and dask workers, caller
programs) is registered here and stopped by PID at the end of the test, whatever
happened. Shared services (Redis 6379, PostgreSQL 5432) are used only under this test's
own key prefix or table, removed afterwards; a missing one fails the test with the
command that starts it.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

HERE = Path(__file__).resolve().parent
for _path in (HERE, HERE.parent / "support"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import faults  # noqa: E402  (tests/support, put on sys.path just above)

REDIS_URL = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("WOVE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
START_REDIS = ('redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" '
               "--appendonly no")
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The session's table: one row per scenario checked (docs/faults.md keeps one)."""
    if faults.RESULTS:
        terminalreporter.write_sep("=", "fault suite counts")
        terminalreporter.write_line(faults.table(faults.RESULTS))


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[..., faults.RedisServer]]:
    """``private_redis(aof=False)``: a started redis-server of this test's own."""
    servers: list[faults.RedisServer] = []

    def make(*, aof: bool = False) -> faults.RedisServer:
        server = faults.RedisServer(tmp_path / f"redis-{len(servers)}", aof=aof)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def caller(tmp_path: Path) -> Iterator[Callable[..., faults.Caller]]:
    """``caller(body, params)``: a caller program, not started yet; stopped at teardown."""
    programs: list[faults.Caller] = []

    def make(body: str, params: dict[str, Any] | None = None, **kwargs: Any) -> faults.Caller:
        program = faults.Caller(tmp_path, body, params, **kwargs)
        programs.append(program)
        return program

    yield make
    for program in programs:
        program.stop()


@pytest.fixture
def rq_worker(tmp_path: Path) -> Iterator[Callable[..., faults.RqWorkerProcess]]:
    """``rq_worker(redis_url, queue)``: a registered ``rq worker``; stopped at teardown."""
    workers: list[faults.RqWorkerProcess] = []

    def make(redis_url: str, queue: str) -> faults.RqWorkerProcess:
        worker = faults.RqWorkerProcess(redis_url, queue, tmp_path)
        workers.append(worker)
        return worker.wait_ready()

    yield make
    for worker in workers:
        worker.stop()


@pytest.fixture
def redis_ledger() -> Iterator[str]:
    """A Redis ledger URL on the shared server, under a key prefix of this test's own."""
    try:
        import redis
    except ImportError:
        pytest.fail("redis-py is missing: pip install 'wove-adapters[redis]'")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}). Start it with: "
                    f"{START_REDIS}")
    prefix = f"wove-faults:{uuid.uuid4().hex[:12]}:"
    yield f"{REDIS_URL}?prefix={quote(prefix, safe='')}"
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def postgres_ledger() -> Iterator[str]:
    """A PostgreSQL ledger URL with a table of this test's own, dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is missing: pip install 'wove-adapters[postgres]'")
    try:
        conn = psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}). Start it with: "
                    f"{START_POSTGRES}")
    table = f"wove_faults_{uuid.uuid4().hex[:12]}"
    yield f"{POSTGRES_URL}?table={table}"
    conn.execute(f'DROP TABLE IF EXISTS "{table}"')
    conn.close()


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
    from wove_adapters.integration.hub import Hub

    hubs: list[Hub] = []

    def make(definition: dict[str, Any], *, ledger: str | None = None) -> Hub:
        hub = Hub(environments={"faults": definition}, default_environment="faults",
                  ledger=ledger)
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.close()
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

