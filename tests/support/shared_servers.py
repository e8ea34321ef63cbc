"""The machine's shared Redis and PostgreSQL: ping-or-fail, and ledgers, one namespace per test.

The ledger contract, the fault suite, the security tests and the receiver faults all put
ledgers on the same two shared servers. Each test works under a key prefix or a table of
its own and removes it afterwards; nothing else on the server is touched (no FLUSHDB).
A server that is not running fails the test with the command that starts it: a silently
skipped backend is a backend nobody tested.

Override the servers with WOVE_TEST_REDIS_URL / WOVE_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import services

REDIS_URL = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("WOVE_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def require_module(module: str, what: str, install: str) -> ModuleType:
    """``module``, or the test fails saying how to install it: a library the suite's tox
    env installs must never turn into a silent skip there."""
    import pytest

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"{what} is missing: {install}", pytrace=False)


def _require(module: str, what: str, extra: str) -> ModuleType:
    return require_module(module, what, f"pip install 'wove-adapters[{extra}]'")


def redis_client(*, suite: str) -> Any:
    """A client of the shared Redis; the calling test fails, saying how to start Redis,
    when it does not answer."""
    redis = _require("redis", "redis-py", "redis")
    services.require_redis(REDIS_URL, url_env="WOVE_TEST_REDIS_URL", suite=suite)
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)


def postgres_connection() -> Any:
    """An autocommit connection to the shared PostgreSQL; the calling test fails, saying
    how to start it, when it does not answer."""
    import pytest

    psycopg = _require("psycopg", "psycopg", "postgres")
    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL} ({exc}). Start it with "
                    f"`{START_POSTGRES}` (or point WOVE_TEST_POSTGRES_URL at one).",
                    pytrace=False)


@contextlib.contextmanager
def redis_ledger(prefix: str, *, suite: str) -> Iterator[str]:
    """A Redis ledger URL under ``prefix``; every key under it is deleted afterwards."""
    client = redis_client(suite=suite)
    try:
        yield f"{REDIS_URL}?prefix={quote(prefix, safe='')}"
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@contextlib.contextmanager
def postgres_ledger(table: str) -> Iterator[str]:
    """A PostgreSQL ledger URL with ``table`` of its own, dropped afterwards."""
    conn = postgres_connection()
    try:
        yield f"{POSTGRES_URL}?table={table}"
    finally:
        conn.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_leases"')
        conn.close()


@contextlib.contextmanager
def ledger(kind: str, name: str, tmp_path: Path, *, suite: str) -> Iterator[str]:
    """A fresh ledger of ``kind`` ("sqlite", "redis" or "postgres") named ``name``: a
    file under ``tmp_path``, the key prefix ``<name>:``, or the table ``<name>``."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / f'{name}.db'}"
    elif kind == "redis":
        with redis_ledger(f"{name}:", suite=suite) as url:
            yield url
    elif kind == "postgres":
        with postgres_ledger(name) as url:
            yield url
    else:
        raise ValueError(f"no shared ledger of kind {kind!r}")
