"""``postgresql://user@host:port/db?table=wove_runs``: a ledger in an existing PostgreSQL.

For teams that already run PostgreSQL and want runs next to their other data, queryable
with SQL. One table (default ``wove_runs``, created on first use), one row per run.

Why it is built this way:

- ``claim`` takes ``pg_advisory_xact_lock`` on a hash of (table, key) before checking for a
  holder, so two processes claiming one key serialize on the server and exactly one
  inserts. A unique index cannot express the rule: a key is held only while its run is in
  a holding state, and a released run may later turn ``succeeded`` (a detached worker
  finishing), which a partial unique index would refuse.
- One ``psycopg.AsyncConnection`` per running event loop (async connections bind to their
  loop), with an ``asyncio.Lock`` around each use: a transaction must not interleave with
  another task's statements on the same connection. A broken connection is replaced on
  the next call; nothing is retried automatically, since a blind retry of ``set_outcome``
  could report a lost race it actually won.

``psycopg`` is imported lazily (``pip install 'wove-adapters[postgres]'``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

from wove_adapters.core.ledger import (
    HOLDING_STATES,
    SEALED_STATES,
    PerLoop,
    check_outcome_state,
    check_update,
    created_record,
    forward_assignments,
    list_filters,
)
from wove_adapters.core.ledger.base import (
    Ledger,
    LedgerWrite,
    RunFilter,
    RunRecord,
    Update,
    import_client,
    split_parameter,
)

if TYPE_CHECKING:
    from types import ModuleType

DEFAULT_TABLE: Final = "wove_runs"
_TABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,49}")  # room for index suffixes
_FIELDS: Final = tuple(RunRecord.__struct_fields__)
_COLUMNS: Final = ", ".join(_FIELDS)
_HOLDING: Final = sorted(HOLDING_STATES)
_SEALED: Final = sorted(SEALED_STATES)
def _import_psycopg() -> ModuleType:
    return import_client("psycopg", extra="postgres")


def parse_postgres_url(url: str) -> tuple[str, str]:
    """Split off our ``table`` parameter: (conninfo URL for psycopg, table name)."""
    # connect_timeout: fail fast when the server is down.
    conninfo, table = split_parameter(url, "table", DEFAULT_TABLE, connect_timeout="5")
    if not _TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"PostgreSQL ledger URL {url!r}: table {table!r} must be a plain identifier "
            "(letters, digits, underscore; at most 50 characters)."
        )
    return conninfo, table


class _Sql:
    """The statements for one table (the name is validated, so formatting it in is safe)."""

    def __init__(self, table: str) -> None:
        t = f'"{table}"'
        leases = f'"{table}_leases"'
        self.schema = [
            f"""CREATE TABLE IF NOT EXISTS {t} (
                seq             BIGSERIAL,
                run_id          TEXT PRIMARY KEY,
                environment     TEXT NOT NULL,
                task_id         TEXT NOT NULL DEFAULT '',
                adapter         TEXT NOT NULL DEFAULT '',
                idempotency_key TEXT,
                attempt         INTEGER NOT NULL DEFAULT 1,
                state           TEXT NOT NULL,
                submission      TEXT,
                outcome         BYTEA,
                created_at      DOUBLE PRECISION NOT NULL,
                updated_at      DOUBLE PRECISION NOT NULL
            )""",
            f'CREATE INDEX IF NOT EXISTS "{table}_key_idx" ON {t} (idempotency_key, created_at)',
            f'CREATE INDEX IF NOT EXISTS "{table}_created_idx" ON {t} (created_at)',
            f"""CREATE TABLE IF NOT EXISTS {leases} (
                name    TEXT PRIMARY KEY,
                holder  TEXT NOT NULL,
                expires DOUBLE PRECISION NOT NULL
            )""",
        ]
        # Parameters: name, holder, expires, now. Returns a row when the holder has it.
        self.lease = (
            f"INSERT INTO {leases} (name, holder, expires) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, "
            f"expires = EXCLUDED.expires WHERE {leases}.expires <= %s "
            f"OR {leases}.holder = EXCLUDED.holder RETURNING holder"
        )
        self.lease_holder = f"SELECT holder FROM {leases} WHERE name = %s AND expires > %s"
        self.renew = f"UPDATE {leases} SET expires = %s WHERE name = %s AND holder = %s"
        self.drop = f"DELETE FROM {leases} WHERE name = %s AND holder = %s"
        self.lock = "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))"
        self.select = f"SELECT {_COLUMNS} FROM {t}"
        self.get = f"{self.select} WHERE run_id = %s"
        self.holder = (
            f"{self.select} WHERE idempotency_key = %s AND state = ANY(%s) "
            "ORDER BY created_at DESC, seq DESC LIMIT 1"
        )
        self.by_key = (
            f"{self.select} WHERE idempotency_key = %s ORDER BY created_at DESC, seq DESC LIMIT 1"
        )
        self.insert = (
            f"INSERT INTO {t} ({_COLUMNS}) VALUES ({', '.join(['%s'] * len(_FIELDS))}) "
            "ON CONFLICT (run_id) DO NOTHING RETURNING run_id"
        )
        # Parameters: state, outcome, updated_at, run_id, sealed states, state.
        self.set_outcome = (
            f"UPDATE {t} SET state = %s, outcome = %s, updated_at = %s "
            "WHERE run_id = %s AND outcome IS NULL AND (NOT state = ANY(%s) OR state = %s)"
        )
        self.exists = f"SELECT 1 FROM {t} WHERE run_id = %s"
        self.update = f"UPDATE {t} SET {{assignments}} WHERE run_id = %s"
        self.delete = f"DELETE FROM {t} WHERE run_id = %s"
        self.count = f"SELECT environment, adapter, state, COUNT(*) FROM {t} GROUP BY 1, 2, 3"
        self.ddl_lock_key = f"wove-adapters-ledger-ddl:{table}"
        self.table = table


def _record(row: Sequence[Any]) -> RunRecord:
    return RunRecord(**dict(zip(_FIELDS, row, strict=True)))


@dataclasses.dataclass
class _Slot:
    """One loop's connection and the lock that keeps its transactions whole."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    conn: Any = None


class PostgresLedger(Ledger):
    """Runs as rows of one table; claims serialized by advisory locks (see module docstring)."""

    def __init__(self, url: str) -> None:
        self._psycopg = _import_psycopg()
        self.url = url
        self._conninfo, self.table = parse_postgres_url(url)
        self._sql = _Sql(self.table)
        self._slots: PerLoop[_Slot] = PerLoop()
        self._schema_ready = False

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        slot = self._slots.get_or_create(_Slot)
        async with slot.lock:
            if slot.conn is None or slot.conn.closed or slot.conn.broken:
                slot.conn = await self._psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True
                )
            if not self._schema_ready:
                async with slot.conn.transaction():
                    # Concurrent CREATE TABLE IF NOT EXISTS can still collide in the
                    # catalog; a lock on the table name makes first use race-free.
                    await slot.conn.execute(self._sql.lock, (self._sql.ddl_lock_key,))
                    for statement in self._sql.schema:
                        await slot.conn.execute(statement)
                self._schema_ready = True
            yield slot.conn

    async def claim(self, record: RunRecord) -> RunRecord:
        async with self._connection() as conn, conn.transaction():
            return await self._claim_on(conn, record)

    async def _claim_on(self, conn: Any, record: RunRecord) -> RunRecord:
        """In the caller's transaction: the key's advisory lock is held until it commits."""
        sql = self._sql
        key = record.idempotency_key
        if key is not None:
            await conn.execute(sql.lock, (f"{sql.table}:{key}",))
        row = await (await conn.execute(sql.get, (record.run_id,))).fetchone()
        if row is not None:  # a retried claim of the same run: it already owns it
            return _record(row)
        if key is not None:
            row = await (await conn.execute(sql.holder, (key, _HOLDING))).fetchone()
            if row is not None:
                return _record(row)
        values = tuple(getattr(record, name) for name in _FIELDS)
        inserted = await (await conn.execute(sql.insert, values)).fetchone()
        if inserted is None:  # the same run_id (no key, so no lock) won a moment ago
            row = await (await conn.execute(sql.get, (record.run_id,))).fetchone()
            return _record(row)
        return record

    async def update(self, run_id: str, **fields: object) -> None:
        checked = check_update(run_id, fields)
        async with self._connection() as conn:
            await self._update_on(conn, run_id, checked)

    async def _update_on(self, conn: Any, run_id: str, checked: dict[str, object]) -> None:
        assignments, params = forward_assignments(checked, "%s")
        statement = self._sql.update.format(assignments=", ".join(assignments))
        cursor = await conn.execute(statement, (*params, run_id))
        if cursor.rowcount == 0:
            raise KeyError(f"No run {run_id!r} in ledger {self.url}")

    async def set_outcome(self, run_id: str, state: str, outcome: bytes | None) -> bool:
        check_outcome_state(state)
        async with self._connection() as conn:
            return await self._set_outcome_on(conn, run_id, state, outcome)

    async def _set_outcome_on(
        self, conn: Any, run_id: str, state: str, outcome: bytes | None
    ) -> bool:
        cursor = await conn.execute(
            self._sql.set_outcome, (state, outcome, time.time(), run_id, _SEALED, state)
        )
        if cursor.rowcount:
            return True
        if await (await conn.execute(self._sql.exists, (run_id,))).fetchone() is None:
            raise KeyError(f"No run {run_id!r} in ledger {self.url}")
        return False

    async def write_many(self, writes: list[LedgerWrite]) -> list[object]:
        """One transaction for a loop turn's writes (see ``Ledger.write_many``)."""
        results: list[object] = []
        async with self._connection() as conn, conn.transaction():
            for write in writes:
                try:
                    if isinstance(write, RunRecord):
                        results.append(await self._claim_on(conn, write))
                    elif isinstance(write, Update):
                        checked = check_update(write.run_id, write.fields)
                        await self._update_on(conn, write.run_id, checked)
                        results.append(None)
                    else:
                        check_outcome_state(write.state)
                        results.append(await self._set_outcome_on(
                            conn, write.run_id, write.state, write.outcome
                        ))
                except (KeyError, ValueError) as exc:
                    results.append(exc)
        return results

    async def get(self, run_id: str) -> RunRecord | None:
        async with self._connection() as conn:
            row = await (await conn.execute(self._sql.get, (run_id,))).fetchone()
        return None if row is None else _record(row)

    async def by_key(self, idempotency_key: str) -> RunRecord | None:
        async with self._connection() as conn:
            row = await (await conn.execute(self._sql.by_key, (idempotency_key,))).fetchone()
        return None if row is None else _record(row)

    async def select_runs(self, filters: RunFilter, limit: int) -> list[RunRecord]:
        clause, params = list_filters(filters, "%s")
        statement = f"{self._sql.select}{clause} ORDER BY created_at DESC, seq DESC LIMIT %s"
        async with self._connection() as conn:
            cursor = await conn.execute(statement, (*params, limit))
            rows = await cursor.fetchall()
        return [_record(row) for row in rows]

    async def count_runs(self) -> dict[tuple[str, str, str], int]:
        async with self._connection() as conn:
            cursor = await conn.execute(self._sql.count)
            rows = await cursor.fetchall()
        return {(env, adapter, state): int(n) for env, adapter, state, n in rows}

    async def delete(self, run_id: str) -> None:
        async with self._connection() as conn:
            await conn.execute(self._sql.delete, (run_id,))

    async def lease(self, name: str, holder: str, seconds: float) -> str | None:
        async with self._connection() as conn:
            while True:
                now = time.time()
                cursor = await conn.execute(self._sql.lease, (name, holder, now + seconds, now))
                if await cursor.fetchone() is not None:
                    return None
                row = await (await conn.execute(self._sql.lease_holder, (name, now))).fetchone()
                if row is not None:
                    return str(row[0])
                # It expired between the two statements: nobody has it; ask again.

    async def renew_leases(self, held: dict[str, str], seconds: float) -> None:
        if not held:
            return
        expires = time.time() + seconds
        async with self._connection() as conn, conn.cursor() as cursor:
            await cursor.executemany(
                self._sql.renew, [(expires, name, holder) for name, holder in held.items()]
            )

    async def drop_lease(self, name: str, holder: str) -> None:
        async with self._connection() as conn:
            await conn.execute(self._sql.drop, (name, holder))

    async def lease_holder(self, name: str) -> str | None:
        async with self._connection() as conn:
            cursor = await conn.execute(self._sql.lease_holder, (name, time.time()))
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def aclose(self) -> None:
        """Close this loop's connection. Each loop that used the ledger closes its own (a
        connection cannot be closed from another loop); those of closed loops are dropped."""
        slot = self._slots.pop_current()
        if slot is not None and slot.conn is not None:
            async with slot.lock:
                await slot.conn.close()


def record_outcome_sync(
    url: str, run_id: str, state: str, outcome: bytes, *, create: RunRecord | None = None
) -> bool:
    """``core.ledger.record_outcome_sync`` for ``postgresql://`` (which checked its
    arguments): psycopg's sync connection, one short-lived connection."""
    psycopg = _import_psycopg()
    conninfo, table = parse_postgres_url(url)
    sql = _Sql(table)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        if create is not None:
            values = tuple(getattr(created_record(create, state, outcome), n) for n in _FIELDS)
            try:
                inserted = conn.execute(sql.insert, values).fetchone()
            except psycopg.errors.UndefinedTable:  # nobody used this ledger yet
                with conn.transaction():
                    conn.execute(sql.lock, (sql.ddl_lock_key,))
                    for statement in sql.schema:
                        conn.execute(statement)
                inserted = conn.execute(sql.insert, values).fetchone()
            if inserted is not None:
                return True
        try:
            cursor = conn.execute(
                sql.set_outcome, (state, outcome, time.time(), run_id, _SEALED, state)
            )
        except psycopg.errors.UndefinedTable as exc:
            raise KeyError(f"No run {run_id!r} in ledger {url} (no table {table!r})") from exc
        if cursor.rowcount:
            return True
        if conn.execute(sql.exists, (run_id,)).fetchone() is None:
            raise KeyError(f"No run {run_id!r} in ledger {url}")
        return False
