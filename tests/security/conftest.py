"""Shared plumbing for the security suite: real components, started as the code starts them.

- ``receiver_for(**executor_config)``: the caller's shared HTTP receiver, from
  ``get_receiver`` on the project's shared loop (where a Hub's runs meet it), with a
  token of its own so tests never share one; closed after the test.
- ``key_id``: a key this process holds (as a caller holds the key it signs with).
- ``sign(events, key_id)``: a signed event batch, as a worker sends it.
- ``round_trip(receiver, key_id)``: one legitimate event through the worker's own sender
  on a new connection; True once its run's sink has it.
- ``traceback_log``: log records that carry a traceback, from any logger.
- ``post_raw(receiver, body, ...)``: a raw POST's status (0: no answer, the connection
  closed), never raising.
- ``marker``: the file a broker writer's planted pickle creates when unpickled
  (``broker_planting.Bomb``); ``tests/support`` is on ``sys.path`` for the broker suites.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.callbacks.receiver import CallbackReceiver, get_receiver
from wove_adapters.core import frames, signing
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.codec import sign_events
from wove_adapters.core.envelope import ReturnPath
from wove_adapters.worker import sender

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

# A pickle of 7: what a genuine task_result carries.
SEVEN = b"\x80\x04K\x07."


def signed(events: list[frames.WireEvent], key_id: str) -> bytes:
    return signing.encode_blob(sign_events(events, key_id))


def result_event(run_id: str, result: bytes = SEVEN) -> frames.TaskResult:
    return frames.TaskResult(run_id=run_id, task_id="t", attempt=1, result=result)


@pytest.fixture
def receiver_for() -> Iterator[Callable[..., CallbackReceiver]]:
    started: list[CallbackReceiver] = []

    def start(**config: Any) -> CallbackReceiver:
        config.setdefault("callback_token", f"sec-{uuid.uuid4().hex}")
        receiver = shared_loop.run_sync(get_receiver(config), timeout=30)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        shared_loop.run_sync(receiver.aclose(), timeout=30)


@pytest.fixture(scope="session")
def key_id() -> str:
    return signing.KEYRING.generate()


@pytest.fixture
def round_trip() -> Callable[[CallbackReceiver, str], bool]:
    def go(receiver: CallbackReceiver, key_id: str) -> bool:
        run_id = f"legit-{uuid.uuid4().hex}"
        arrived = threading.Event()
        receiver.register(run_id, lambda event, raw: arrived.set(), key_id=key_id)
        try:
            sender.close_connections()  # a new connection, as from a new worker
            sender.post(ReturnPath(kind="http", url=receiver.url), key_id,
                        [result_event(run_id)], budget=10)
            return arrived.wait(5)
        except Exception:
            return False
        finally:
            receiver.unregister(run_id)

    return go


class _Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture
def traceback_log() -> Iterator[list[logging.LogRecord]]:
    handler = _Tracebacks()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.records
    finally:
        root.removeHandler(handler)


def http_status(
    receiver: CallbackReceiver,
    body: bytes,
    *,
    path: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> int:
    """One raw request on a new connection (the path as given, not re-encoded)."""
    if path is None:
        path = "/" + receiver.url.split("/", 3)[3]
    head = {"Host": "x", "Content-Length": str(len(body)), **(headers or {})}
    text = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    with socket.create_connection((receiver.host, receiver.port), timeout=timeout) as sock:
        try:
            sock.sendall(text.encode("utf-8", "surrogateescape") + b"\r\n" + body)
            answer = sock.recv(64)
        except OSError:
            return 0
    if not answer.startswith(b"HTTP/1.1 "):
        return 0
    return int(answer[9:12])


@pytest.fixture(scope="session")
def sign() -> Callable[[list[frames.WireEvent], str], bytes]:
    """``sign(events, key_id)``: a signed event batch, as a worker sends it."""
    return signed


@pytest.fixture(scope="session")
def post_raw() -> Callable[..., int]:
    """``post_raw(receiver, body, path=, headers=, timeout=)``: see ``http_status``."""
    return http_status


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    """Where a planted pickle, once unpickled, leaves its trace."""
    return tmp_path / "unpickled-in-the-caller"
