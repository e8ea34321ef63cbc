"""``sqlite:///path``: the embedded default ledger, one file shared by every local process.

URLs follow SQLAlchemy: what follows ``sqlite:///`` is the path, so ``sqlite:///runs.db`` is
relative to the working directory and ``sqlite:////var/lib/wove/runs.db`` (four slashes) is
absolute. ``open_ledger`` turns a relative path into an absolute URL once, so the URL handed
to a worker means the same file wherever the worker runs.

Why it is built this way:

- WAL + ``synchronous=NORMAL``: readers never block the writer, and a commit costs no fsync
  (durable across a process crash; a power cut may lose the last commits, acceptable for a
  run ledger whose backends keep their own state).
- ``busy_timeout`` 5000 ms: concurrent writers from several processes wait instead of
  failing with "database is locked".
- One worker thread per ledger runs every sqlite3 call, so the event loop never blocks and
  the connection is only ever used from one thread. Work is submitted with the *running*
  loop's ``run_in_executor`` on each call, so the ledger binds to no loop.
- ``claim`` runs in ``BEGIN IMMEDIATE``, which takes the database's write lock before the
  key check, so the check and the insert are atomic across processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote

from wove_adapters.core.ledger import (
    HOLDING_STATES,
    SEALED_STATES,
    check_outcome_state,
    check_update,
    created_record,
    forward_assignments,
    list_filters,
)
from wove_adapters.core.ledger.base import Ledger, LedgerWrite, RunFilter, RunRecord, Update

_COLUMNS: Final = tuple(RunRecord.__struct_fields__)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM runs"
_HOLDING_SQL: Final = ", ".join(f"'{state}'" for state in sorted(HOLDING_STATES))
_SEALED_SQL: Final = ", ".join(f"'{state}'" for state in sorted(SEALED_STATES))
SCHEMA_VERSION: Final = 2  # 2: leases
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS runs (
    run_id          TEXT PRIMARY KEY,
    environment     TEXT NOT NULL,
    task_id         TEXT NOT NULL DEFAULT '',
    adapter         TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT,
    attempt         INTEGER NOT NULL DEFAULT 1,
    state           TEXT NOT NULL,
    submission      TEXT,
    outcome         BLOB,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_idempotency_key ON runs (idempotency_key, created_at);
CREATE INDEX IF NOT EXISTS runs_created_at ON runs (created_at);
CREATE TABLE IF NOT EXISTS leases (
    name    TEXT PRIMARY KEY,
    holder  TEXT NOT NULL,
    expires REAL NOT NULL
);
"""

T = TypeVar("T")


def parse_sqlite_url(url: str) -> Path:
    """The absolute database path a ``sqlite:///...`` URL names (relative to the cwd)."""
    prefix = "sqlite://"
    if not url.lower().startswith(prefix):
        raise ValueError(f"Not a SQLite ledger URL: {url!r} (expected 'sqlite:///path').")
    rest, _, query = url[len(prefix) :].partition("?")
    if query:
        raise ValueError(f"SQLite ledger URL {url!r}: query parameters are not supported.")
    if not rest.startswith("/") or rest == "/" or rest[1:] == ":memory:":
        raise ValueError(
            f"SQLite ledger URL {url!r} names no file. Use 'sqlite:///runs.db' (relative to "
            "the working directory) or 'sqlite:////abs/path/runs.db' (absolute); for an "
            "in-process ledger use 'memory://'."
        )
    path = Path(unquote(rest[1:])).expanduser()
    return path if path.is_absolute() else Path.cwd() / path


def sqlite_url(url: str) -> str:
    """The canonical (absolute-path) form of a SQLite ledger URL."""
    return f"sqlite:///{quote(str(parse_sqlite_url(url)), safe='/:~')}"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating file, parent dirs and schema as needed) with the ledger's pragmas.

    ``isolation_level=None`` leaves transactions to us (``BEGIN IMMEDIATE`` in claim);
    ``check_same_thread=False`` only lets the at-exit close run from the main thread once
    the worker thread is gone: all other use stays on the worker thread.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        # Switching to WAL needs a moment of exclusive access; two processes creating the
        # file at once can collide here before the busy handler is involved, so retry.
        for attempt in range(50):
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError:
                if attempt == 49:
                    raise
                time.sleep(0.02)
        conn.execute("PRAGMA synchronous = NORMAL")
        if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            with _immediate(conn):
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that holds the write lock from its first statement."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _record(row: Sequence[Any]) -> RunRecord:
    return RunRecord(**dict(zip(_COLUMNS, row, strict=True)))


def _get(conn: sqlite3.Connection, run_id: str) -> RunRecord | None:
    row = conn.execute(f"{_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
    return None if row is None else _record(row)


def _claim(conn: sqlite3.Connection, record: RunRecord) -> RunRecord:
    with _immediate(conn):
        return _claim_in(conn, record)


def _claim_in(conn: sqlite3.Connection, record: RunRecord) -> RunRecord:
    if record.idempotency_key is None:
        # One statement for the common case; a retried claim of the same run finds its
        # row there and gets the stored one.
        cursor = conn.execute(
            f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES "
            f"({', '.join('?' * len(_COLUMNS))}) ON CONFLICT (run_id) DO NOTHING",
            tuple(getattr(record, name) for name in _COLUMNS),
        )
        if cursor.rowcount == 0:
            return _get(conn, record.run_id) or record
        return record
    existing = _get(conn, record.run_id)
    if existing is not None:  # a retried claim of the same run: it already owns it
        return existing
    if record.idempotency_key is not None:
        row = conn.execute(
            f"{_SELECT} WHERE idempotency_key = ? AND state IN ({_HOLDING_SQL}) "
            "ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (record.idempotency_key,),
        ).fetchone()
        if row is not None:
            return _record(row)
    conn.execute(
        f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
        tuple(getattr(record, name) for name in _COLUMNS),
    )
    return record


def _write_many(conn: sqlite3.Connection, writes: list[LedgerWrite]) -> list[object]:
    """Every write of a loop turn in one transaction (one commit, one hand-off). A write
    that fails (an unknown run) is that write's result; the others still apply."""
    results: list[object] = []
    with _immediate(conn):
        for write in writes:
            try:
                if isinstance(write, RunRecord):
                    results.append(_claim_in(conn, write))
                elif isinstance(write, Update):
                    _update(conn, write.run_id, write.fields)
                    results.append(None)
                else:
                    check_outcome_state(write.state)
                    results.append(
                        set_outcome_on(conn, write.run_id, write.state, write.outcome)
                    )
            except (KeyError, ValueError) as exc:
                results.append(exc)
    return results


def _update(conn: sqlite3.Connection, run_id: str, fields: dict[str, object]) -> None:
    assignments, params = forward_assignments(fields, "?")
    cursor = conn.execute(
        f"UPDATE runs SET {', '.join(assignments)} WHERE run_id = ?", (*params, run_id)
    )
    if cursor.rowcount == 0:
        raise KeyError(f"No run {run_id!r} in the SQLite ledger")


def set_outcome_on(
    conn: sqlite3.Connection, run_id: str, state: str, outcome: bytes | None
) -> bool:
    """First writer wins: the guard (no outcome yet, not ended another way, see
    ``core.ledger.outcome_open``) makes the check-and-set one statement."""
    cursor = conn.execute(
        "UPDATE runs SET state = ?, outcome = ?, updated_at = ? "
        f"WHERE run_id = ? AND outcome IS NULL AND (state NOT IN ({_SEALED_SQL}) OR state = ?)",
        (state, outcome, time.time(), run_id, state),
    )
    if cursor.rowcount:
        return True
    if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
        raise KeyError(f"No run {run_id!r} in the SQLite ledger")
    return False


def _by_key(conn: sqlite3.Connection, key: str) -> RunRecord | None:
    row = conn.execute(
        f"{_SELECT} WHERE idempotency_key = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
        (key,),
    ).fetchone()
    return None if row is None else _record(row)


def _list_runs(
    conn: sqlite3.Connection, clause: str, params: list[object], limit: int
) -> list[RunRecord]:
    rows = conn.execute(
        f"{_SELECT}{clause} ORDER BY created_at DESC, rowid DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_record(row) for row in rows]


def _count_runs(conn: sqlite3.Connection) -> dict[tuple[str, str, str], int]:
    rows = conn.execute(
        "SELECT environment, adapter, state, COUNT(*) FROM runs GROUP BY 1, 2, 3"
    ).fetchall()
    return {(env, adapter, state): int(n) for env, adapter, state, n in rows}


def _delete(conn: sqlite3.Connection, run_id: str) -> None:
    conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))


def _lease(conn: sqlite3.Connection, name: str, holder: str, seconds: float) -> str | None:
    now = time.time()
    with _immediate(conn):
        row = conn.execute("SELECT holder, expires FROM leases WHERE name = ?", (name,)).fetchone()
        if row is not None and row[1] > now and row[0] != holder:
            return str(row[0])
        conn.execute(
            "INSERT OR REPLACE INTO leases (name, holder, expires) VALUES (?, ?, ?)",
            (name, holder, now + seconds),
        )
        return None


def _renew_leases(conn: sqlite3.Connection, held: dict[str, str], seconds: float) -> None:
    expires = time.time() + seconds
    with _immediate(conn):
        conn.executemany(
            "UPDATE leases SET expires = ? WHERE name = ? AND holder = ?",
            [(expires, name, holder) for name, holder in held.items()],
        )


def _drop_lease(conn: sqlite3.Connection, name: str, holder: str) -> None:
    conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))


def _lease_holder(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute(
        "SELECT holder FROM leases WHERE name = ? AND expires > ?", (name, time.time())
    ).fetchone()
    return None if row is None else str(row[0])


class _Worker:
    """One thread and the connection only it touches. Replaced whole after close or fork,
    so work still queued on an old thread never shares a connection with a new one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="wove-ledger-sqlite"
        )
        self.conn: sqlite3.Connection | None = None

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        # Runs on this worker's thread only.
        if self.conn is None:
            self.conn = connect(self.path)
        return fn(self.conn, *args)

    def close_connection(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()


class SqliteLedger(Ledger):
    """A SQLite file driven from one dedicated thread (see the module docstring for why)."""

    def __init__(self, url: str) -> None:
        self.path = parse_sqlite_url(url)
        self.url = sqlite_url(url)
        self._lock = threading.Lock()  # guards the worker's lifecycle, not the database
        self._current: _Worker | None = None
        self._pid = os.getpid()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        # Submitting under the lock orders every job before a concurrent aclose's final
        # close job, so no job can reach a closed (or shut down) worker.
        with self._lock:
            if self._pid != os.getpid():
                # Forked: the parent's thread does not exist here and its connection must
                # not be used by two processes. Abandon both and start fresh.
                self._current, self._pid = None, os.getpid()
            if self._current is None:
                self._current = _Worker(self.path)
            worker = self._current
            future = loop.run_in_executor(
                worker.executor, functools.partial(worker.call, fn, *args)
            )
        return await future

    async def claim(self, record: RunRecord) -> RunRecord:
        return await self._run(_claim, record)

    async def update(self, run_id: str, **fields: object) -> None:
        await self._run(_update, run_id, check_update(run_id, fields))

    async def write_many(self, writes: list[LedgerWrite]) -> list[object]:
        checked: list[LedgerWrite] = []
        for write in writes:
            if isinstance(write, Update):
                write = Update(write.run_id, check_update(write.run_id, write.fields))
            checked.append(write)
        return await self._run(_write_many, checked)

    async def set_outcome(self, run_id: str, state: str, outcome: bytes | None) -> bool:
        check_outcome_state(state)
        return await self._run(set_outcome_on, run_id, state, outcome)

    async def get(self, run_id: str) -> RunRecord | None:
        return await self._run(_get, run_id)

    async def by_key(self, idempotency_key: str) -> RunRecord | None:
        return await self._run(_by_key, idempotency_key)

    async def select_runs(self, filters: RunFilter, limit: int) -> list[RunRecord]:
        clause, params = list_filters(filters, "?")
        return await self._run(_list_runs, clause, params, limit)

    async def count_runs(self) -> dict[tuple[str, str, str], int]:
        return await self._run(_count_runs)

    async def delete(self, run_id: str) -> None:
        await self._run(_delete, run_id)

    async def lease(self, name: str, holder: str, seconds: float) -> str | None:
        return await self._run(_lease, name, holder, seconds)

    async def renew_leases(self, held: dict[str, str], seconds: float) -> None:
        if held:
            await self._run(_renew_leases, dict(held), seconds)

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._run(_drop_lease, name, holder)

    async def lease_holder(self, name: str) -> str | None:
        return await self._run(_lease_holder, name)

    async def aclose(self) -> None:
        """Close the connection on its own thread, after queued work; a later call reopens."""
        loop = asyncio.get_running_loop()
        with self._lock:
            worker, self._current = self._current, None
            if worker is None:
                return
            closed = loop.run_in_executor(worker.executor, worker.close_connection)
            worker.executor.shutdown(wait=False)
        await closed

    def close_sync(self) -> None:
        """Blocking close for interpreter exit, when no event loop may be running."""
        with self._lock:
            worker, self._current = self._current, None
            if worker is None:
                return
            worker.executor.shutdown(wait=False)
        worker.executor.shutdown(wait=True)  # queued work finishes first
        worker.close_connection()


def record_outcome_sync(
    url: str, run_id: str, state: str, outcome: bytes, *, create: RunRecord | None = None
) -> bool:
    """``core.ledger.record_outcome_sync`` for ``sqlite://`` (which checked its
    arguments): one short-lived connection."""
    conn = connect(parse_sqlite_url(url))
    try:
        if create is None:
            return set_outcome_on(conn, run_id, state, outcome)
        with _immediate(conn):
            if _get(conn, run_id) is None:
                record = created_record(create, state, outcome)
                conn.execute(
                    f"INSERT INTO runs ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                    tuple(getattr(record, name) for name in _COLUMNS),
                )
                return True
            return set_outcome_on(conn, run_id, state, outcome)
    finally:
        conn.close()
