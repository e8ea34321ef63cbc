"""The ledger contract on the embedded backends (memory, sqlite), plus what only they do.

The contract itself lives in ``wove_adapters.testing.ledger_contract`` so Redis and
PostgreSQL (tests/integration/core/test_ledger_backends.py) run the very same tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.ledger import (
    SUCCEEDED,
    Ledger,
    close_all,
    open_ledger,
    record_outcome_sync,
)
from wove_adapters.core.ledger.memory import MemoryLedger
from wove_adapters.core.ledger.postgres import parse_postgres_url
from wove_adapters.core.ledger.redis import DEFAULT_PREFIX, parse_redis_url
from wove_adapters.core.ledger.sqlite import SqliteLedger, parse_sqlite_url
from wove_adapters.testing.ledger_contract import LedgerContract, new_record


class TestMemoryLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self) -> AsyncIterator[Ledger]:
        ledger = MemoryLedger()
        yield ledger
        await ledger.aclose()

    def test_is_not_shareable(self) -> None:
        assert MemoryLedger().shareable is False


class TestSqliteLedger(LedgerContract):
    @pytest.fixture
    async def ledger(self, tmp_path: Path) -> AsyncIterator[Ledger]:
        ledger = SqliteLedger(f"sqlite:///{tmp_path}/runs.db")
        yield ledger
        await ledger.aclose()

    async def test_a_version_1_file_gains_the_leases_table(self, tmp_path: Path) -> None:
        path = tmp_path / "old.db"
        ledger = SqliteLedger(f"sqlite:///{path}")
        kept = new_record()
        await ledger.claim(kept)
        await ledger.aclose()
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE leases")
        conn.execute("PRAGMA user_version = 1")  # as written before leases existed
        conn.commit()
        conn.close()
        reopened = SqliteLedger(f"sqlite:///{path}")
        assert await reopened.get(kept.run_id) == kept
        assert await reopened.lease("slot", "run-a", 5) is None
        assert await reopened.lease_holder("slot") == "run-a"
        await reopened.aclose()

    async def test_creates_parent_dirs_schema_and_pragmas(self, tmp_path: Path) -> None:
        path = tmp_path / "deep" / "er" / "runs.db"
        ledger = SqliteLedger(f"sqlite:///{path}")
        await ledger.claim(new_record())
        await ledger.aclose()
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            assert "leases" in tables
            indexes = {row[1] for row in conn.execute("PRAGMA index_list(runs)")}
            assert "runs_idempotency_key" in indexes
            columns = {row[1]: row[2] for row in conn.execute("PRAGMA table_info(runs)")}
            assert columns["outcome"] == "BLOB"
        finally:
            conn.close()

    async def test_runs_on_one_worker_thread_not_the_loop(self, tmp_path: Path) -> None:
        ledger = SqliteLedger(f"sqlite:///{tmp_path}/runs.db")
        seen: set[str] = set()

        def where(conn: sqlite3.Connection) -> None:
            seen.add(threading.current_thread().name)

        await asyncio.gather(*(ledger._run(where) for _ in range(20)))
        await ledger.aclose()
        assert len(seen) == 1
        assert next(iter(seen)).startswith("wove-ledger-sqlite")

    async def test_reopens_after_aclose(self, tmp_path: Path) -> None:
        ledger = SqliteLedger(f"sqlite:///{tmp_path}/runs.db")
        record = new_record()
        await ledger.claim(record)
        await ledger.aclose()
        await ledger.aclose()  # twice is harmless
        assert await ledger.get(record.run_id) == record
        ledger.close_sync()

    def test_serves_loops_one_after_another(self, tmp_path: Path) -> None:
        # What a sync caller does: one asyncio.run per call, one shared instance.
        ledger = SqliteLedger(f"sqlite:///{tmp_path}/runs.db")
        record = new_record()
        asyncio.run(ledger.claim(record))
        assert asyncio.run(ledger.set_outcome(record.run_id, SUCCEEDED, b"x"))
        stored = asyncio.run(ledger.get(record.run_id))
        assert stored is not None and stored.outcome == b"x"
        ledger.close_sync()


class TestSqliteUrls:
    def test_absolute_and_relative(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        assert parse_sqlite_url("sqlite:////var/lib/runs.db") == Path("/var/lib/runs.db")
        assert parse_sqlite_url("sqlite:///runs.db") == tmp_path / "runs.db"
        assert parse_sqlite_url("sqlite:///sub/runs.db") == tmp_path / "sub" / "runs.db"

    @pytest.mark.parametrize(
        "url", ["sqlite://", "sqlite:///", "sqlite:///:memory:", "sqlite://host/x.db"]
    )
    def test_urls_that_name_no_file(self, url: str) -> None:
        with pytest.raises(ValueError, match="names no file"):
            parse_sqlite_url(url)

    def test_query_is_refused(self) -> None:
        with pytest.raises(ValueError, match="query"):
            parse_sqlite_url("sqlite:////tmp/x.db?mode=ro")


class TestNetworkUrls:
    def test_redis_prefix_is_ours_the_rest_is_redis_py(self) -> None:
        assert parse_redis_url("redis://h:1/2") == ("redis://h:1/2", DEFAULT_PREFIX)
        url, prefix = parse_redis_url("redis://h:1/2?prefix=wove:ledger:&socket_timeout=3")
        assert (url, prefix) == ("redis://h:1/2?socket_timeout=3", "wove:ledger:")

    def test_postgres_table_is_ours_the_rest_is_libpq(self) -> None:
        conninfo, table = parse_postgres_url("postgresql://u@h:5432/db?table=my_runs")
        assert table == "my_runs"
        assert conninfo == "postgresql://u@h:5432/db?connect_timeout=5"
        assert parse_postgres_url("postgresql://u@h/db")[1] == "wove_runs"

    @pytest.mark.parametrize("table", ["runs; DROP TABLE x", "1runs", "a" * 51, ""])
    def test_postgres_table_must_be_an_identifier(self, table: str) -> None:
        with pytest.raises(ValueError, match="plain identifier"):
            parse_postgres_url(f"postgresql://u@h/db?table={table}")


class TestOpenLedger:
    @pytest.fixture(autouse=True)
    async def fresh(self) -> AsyncIterator[None]:
        await close_all()
        yield
        await close_all()

    def test_one_instance_per_url(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.chdir(tmp_path)
        a = open_ledger(f"sqlite:///{tmp_path}/runs.db")
        assert open_ledger("sqlite:///runs.db") is a  # relative spelling, same file
        assert a.url == f"sqlite:///{tmp_path}/runs.db"
        assert open_ledger("memory://") is open_ledger("memory://")
        assert open_ledger("memory://other") is not open_ledger("memory://")
        assert isinstance(open_ledger("memory://"), MemoryLedger)

    async def test_close_all_starts_fresh(self) -> None:
        first = open_ledger("memory://")
        await close_all()
        assert open_ledger("memory://") is not first

    def test_default_is_sqlite_under_wove_adapters_home(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("WOVE_ADAPTERS_HOME", str(tmp_path / "home"))
        ledger = open_ledger(None)
        assert isinstance(ledger, SqliteLedger)
        assert ledger.path == tmp_path / "home" / "runs.db"
        assert ledger.shareable

    @pytest.mark.parametrize("url", ["mysql://h/db", "runs.db", "file:///tmp/runs.db"])
    def test_unknown_scheme_lists_the_supported_ones(self, url: str) -> None:
        with pytest.raises(ValueError, match="memory, sqlite, redis, postgresql"):
            open_ledger(url)

    @pytest.mark.parametrize(
        ("url", "module", "extra"),
        [
            ("redis://127.0.0.1:6379/0", "redis", "redis"),
            ("postgresql://u@h/db", "psycopg", "postgres"),
        ],
    )
    def test_missing_library_names_the_extra(
        self, url: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in list(sys.modules):
            if name == module or name.startswith(module + "."):
                monkeypatch.setitem(sys.modules, name, None)
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingBackendError, match=rf"wove-adapters\[{extra}\]"):
            open_ledger(url)


class TestRecordOutcomeSync:
    def test_memory_is_refused(self) -> None:
        with pytest.raises(ValueError, match="not shareable"):
            record_outcome_sync("memory://", "run-1", SUCCEEDED, b"x")

    def test_unknown_scheme_and_state_are_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="scheme"):
            record_outcome_sync("ftp://x", "run-1", SUCCEEDED, b"x")
        with pytest.raises(ValueError, match="terminal state"):
            record_outcome_sync(f"sqlite:///{tmp_path}/r.db", "run-1", "running", b"x")

    def test_without_any_event_loop(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path}/runs.db"
        ledger = SqliteLedger(url)
        record = new_record()
        asyncio.run(ledger.claim(record))
        assert record_outcome_sync(url, record.run_id, SUCCEEDED, b"one") is True
        assert record_outcome_sync(url, record.run_id, SUCCEEDED, b"two") is False
        stored = asyncio.run(ledger.get(record.run_id))
        assert stored is not None and stored.outcome == b"one"
        ledger.close_sync()


@pytest.fixture(autouse=True)
def _no_leaked_sqlite_threads() -> Iterator[None]:
    """Every test closes what it opened: no sqlite worker thread outlives its test."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith("wove-ledger-sqlite") and t.is_alive()
    ]
    # shutdown(wait=False) lets a worker exit a moment after its close job.
    for thread in leaked:
        thread.join(timeout=2)
    assert not [t for t in leaked if t.is_alive()]
