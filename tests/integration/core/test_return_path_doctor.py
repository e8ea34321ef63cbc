"""``wove-adapters doctor``'s row of the way back, which every adapter gets from its
transport (``callbacks.inbox.Inbox.doctor_rows``): a real receiver answering its health
check (or not), a loopback receiver while the backend names workers on other hosts, and a
drop box whose private ``redis-server`` is up, then killed. Real components only."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from wove_adapters.callbacks.dropbox import DropboxReader
from wove_adapters.callbacks.inbox import PING_SECONDS, Inbox
from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.doctor import Row, checked_row

_TESTS_DIR = str(Path(__file__).resolve().parents[2] / "support")
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from faults import RedisServer  # noqa: E402


async def _no_outcomes(handles: Sequence[str]) -> dict[str, bytes | Exception]:
    return {}


def _inbox(receiver: CallbackReceiver) -> Inbox:
    return Inbox("test", lambda frame: None, key_id="k", receiver=receiver,
                 ledger_url=None, store_url=None, grace=(0.0, 0.0),
                 outcomes=_no_outcomes, on_started=lambda run_id: None)


def test_receiver_row_answers_and_flags_loopback_with_remote_workers() -> None:
    async def scenario() -> dict[str, Row]:
        receiver = CallbackReceiver(host="127.0.0.1", port=0)
        await receiver.start()
        inbox = _inbox(receiver)
        try:
            rows = {
                "unknown hosts": (await inbox.doctor_rows(None))[0],
                "this host": (await inbox.doctor_rows([socket.gethostname()]))[0],
                "remote": (await inbox.doctor_rows(["gpu-node-7", socket.gethostname()]))[0],
            }
        finally:
            await receiver.aclose()
        rows["closed"] = (await inbox.doctor_rows(None))[0]
        return rows

    rows = shared_loop.run_sync(scenario(), 60)
    base = rows["unknown hosts"][2]
    assert base.startswith("http://127.0.0.1:"), rows
    assert rows["unknown hosts"][:2] == ("receiver reachable", True), rows
    assert rows["this host"][:2] == ("receiver reachable", True), rows
    _, ok, detail = rows["remote"]
    assert not ok and "gpu-node-7" in detail and "callback_host" in detail, rows
    _, ok, detail = rows["closed"]
    assert not ok and detail.startswith(base), rows


def test_dropbox_row_follows_its_redis(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        async def scenario() -> tuple[Row, Row]:
            dropbox = DropboxReader(server.url(), key=f"wove-test-doctor:{uuid.uuid4().hex}")
            await dropbox.start()
            inbox = _inbox(dropbox)
            try:
                up = (await inbox.doctor_rows(None))[0]
                server.kill()
                started = time.monotonic()
                down = (await inbox.doctor_rows(None))[0]
                took.append(time.monotonic() - started)
            finally:
                await dropbox.aclose()
            return up, down

        took: list[float] = []
        up, down = shared_loop.run_sync(scenario(), 60)
    finally:
        server.stop()
    assert up == ("return path (redis drop box) reachable", True, server.url()), up
    assert down[:2] == ("return path (redis drop box) reachable", False), down
    assert "return_redis_url" in down[2], down
    assert took[0] < PING_SECONDS + 2, f"the row of a dead drop box took {took[0]:.1f}s"


def test_dropbox_closes_while_its_redis_is_down(tmp_path: Path) -> None:
    """A drop box whose Redis died closes promptly (the caller's exit waits on it). Doctor
    PINGs it, Redis is killed, doctor PINGs again (that failure, inside the Redis client,
    can swallow the reader's cancel: its ``while True`` then never ended and ``aclose``
    waited for good, about half the time). Several rounds, a fresh Redis each."""
    server = RedisServer(tmp_path / "redis")
    took: list[float] = []
    try:
        async def round_() -> None:
            dropbox = DropboxReader(server.url(), key=f"wove-test-close:{uuid.uuid4().hex}")
            await dropbox.start()
            assert (await checked_row("ping", dropbox.ping(), "up", repr))[1]
            server.kill()
            assert not (await checked_row("ping", dropbox.ping(), "up", repr))[1]
            started = time.monotonic()
            await asyncio.wait_for(dropbox.aclose(), 30)
            took.append(time.monotonic() - started)

        for _ in range(6):
            server.start()
            shared_loop.run_sync(round_(), 60)
    finally:
        server.stop()
    assert max(took) < 4.0, f"closing a drop box whose Redis is down took {took}"


def test_dropbox_outage_is_logged_once_then_its_end(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While the drop box's Redis is down its reader retries twice a second; it says so
    once (not every half second), and says when reads work again."""
    server = RedisServer(tmp_path / "redis").start()
    caplog.set_level(logging.WARNING, logger="wove_adapters.dropbox")
    try:
        async def scenario() -> tuple[int, bool]:
            dropbox = DropboxReader(server.url(), key=f"wove-test-outage:{uuid.uuid4().hex}")
            await dropbox.start()
            try:
                server.kill()
                await asyncio.sleep(3.0)  # about six failed reads
                failed = sum("read failed" in r.getMessage() for r in caplog.records)
                server.start()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if any("reads again" in r.getMessage() for r in caplog.records):
                        return failed, True
                    await asyncio.sleep(0.1)
                return failed, False
            finally:
                await dropbox.aclose()

        failed, recovered = shared_loop.run_sync(scenario(), 60)
    finally:
        server.stop()
    assert failed == 1, [r.getMessage() for r in caplog.records]
    assert recovered, [r.getMessage() for r in caplog.records]
