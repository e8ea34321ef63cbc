"""The ledger contract against a real Redis and a real PostgreSQL on this machine.

Each test gets its own key prefix / table, removed afterwards; nothing else in the server
is touched (no FLUSHDB). A server that is not running fails the test with the command
that starts it: a silently skipped backend is a backend nobody tested.

Override the servers with WOVE_TEST_REDIS_URL / WOVE_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import pytest

from wove_adapters.core.ledger import Ledger
from wove_adapters.testing.ledger_contract import LedgerContract, new_record

REDIS_URL = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("WOVE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
RUN = uuid.uuid4().hex[:12]  # one test session's namespace

START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _redis_client():  # type: ignore[no-untyped-def]
    try:
        import redis
    except ImportError:
        pytest.fail("redis-py is missing: pip install 'wove-adapters[redis]'")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.exceptions.ConnectionError as exc:
        client.close()
        pytest.fail(f"Redis is not reachable at {REDIS_URL} ({exc}). Start it with: {START_REDIS}")
    return client


def _postgres_connection():  # type: ignore[no-untyped-def]
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is missing: pip install 'wove-adapters[postgres]'")
    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}). Start it with: "
            f"{START_POSTGRES}"
        )


class TestRedisLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self) -> AsyncIterator[Ledger]:
        from wove_adapters.core.ledger.redis import RedisLedger

        client = _redis_client()
        prefix = f"wove-adapters-test:{RUN}:{uuid.uuid4().hex[:8]}:"
        ledger = RedisLedger(f"{REDIS_URL}?prefix={quote(prefix, safe='')}")
        try:
            yield ledger
        finally:
            await ledger.aclose()
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    async def test_keys_stay_under_the_prefix(self, ledger: Ledger) -> None:
        from wove_adapters.core.ledger.redis import RedisLedger

        assert isinstance(ledger, RedisLedger)
        record = new_record(idempotency_key="k-prefix")
        await ledger.claim(record)
        client = _redis_client()
        try:
            ours = {k.decode() for k in client.scan_iter(match=f"{ledger.prefix}*")}
        finally:
            client.close()
        assert ours == {
            f"{ledger.prefix}run:{record.run_id}",
            f"{ledger.prefix}key:k-prefix",
            f"{ledger.prefix}runs",
        }


class TestPostgresLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self) -> AsyncIterator[Ledger]:
        from wove_adapters.core.ledger.postgres import PostgresLedger

        conn = _postgres_connection()
        table = f"wove_test_{RUN}_{uuid.uuid4().hex[:8]}"
        ledger = PostgresLedger(f"{POSTGRES_URL}?table={table}")
        try:
            yield ledger
        finally:
            await ledger.aclose()
            conn.execute(f'DROP TABLE IF EXISTS "{table}"')
            conn.close()

    async def test_table_is_created_on_first_use(self, ledger: Ledger) -> None:
        from wove_adapters.core.ledger.postgres import PostgresLedger

        assert isinstance(ledger, PostgresLedger)
        await ledger.get("nothing")
        conn = _postgres_connection()
        try:
            columns = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns "
                    "WHERE table_name = %s",
                    (ledger.table,),
                ).fetchall()
            )
        finally:
            conn.close()
        assert columns["outcome"] == "bytea"
        assert {"run_id", "idempotency_key", "state", "created_at"} <= set(columns)
