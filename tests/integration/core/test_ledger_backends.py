"""The ledger contract against a real Redis and a real PostgreSQL on this machine.

Each test gets its own key prefix / table, removed afterwards; nothing else in the server
is touched (no FLUSHDB). A server that is not running fails the test with the command
that starts it: a silently skipped backend is a backend nobody tested.

Override the servers with WOVE_TEST_REDIS_URL / WOVE_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from wove_adapters.core.ledger import Ledger
from wove_adapters.testing.ledger_contract import LedgerContract, new_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from shared_servers import (
    postgres_connection,
    postgres_ledger,
    redis_client,
    redis_ledger,
)

RUN = uuid.uuid4().hex[:12]  # one test session's namespace


class TestRedisLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self) -> AsyncIterator[Ledger]:
        from wove_adapters.core.ledger.redis import RedisLedger

        prefix = f"wove-adapters-test:{RUN}:{uuid.uuid4().hex[:8]}:"
        with redis_ledger(prefix, suite="ledger") as url:
            async with contextlib.aclosing(RedisLedger(url)) as ledger:
                yield ledger

    async def test_keys_stay_under_the_prefix(self, ledger: Ledger) -> None:
        from wove_adapters.core.ledger.redis import RedisLedger

        assert isinstance(ledger, RedisLedger)
        record = new_record(idempotency_key="k-prefix")
        await ledger.claim(record)
        with redis_client(suite="ledger") as client:
            ours = {k.decode() for k in client.scan_iter(match=f"{ledger.prefix}*")}
        assert ours == {
            f"{ledger.prefix}run:{record.run_id}",
            f"{ledger.prefix}key:k-prefix",
            f"{ledger.prefix}runs",
        }


class TestPostgresLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self) -> AsyncIterator[Ledger]:
        from wove_adapters.core.ledger.postgres import PostgresLedger

        with postgres_ledger(f"wove_test_{RUN}_{uuid.uuid4().hex[:8]}") as url:
            async with contextlib.aclosing(PostgresLedger(url)) as ledger:
                yield ledger

    async def test_table_is_created_on_first_use(self, ledger: Ledger) -> None:
        from wove_adapters.core.ledger.postgres import PostgresLedger

        assert isinstance(ledger, PostgresLedger)
        await ledger.get("nothing")
        conn = postgres_connection()
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
