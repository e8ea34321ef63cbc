"""The way back from a worker that runs payloads in threads (ARQ's ``isolation="thread"``),
where several runs share the process's one connection to their caller
(``worker.sender``), against real HTTP servers:

- a run whose first try finds the connection held by an answer that is only late waits
  for it (up to its grace) and is delivered inline, instead of being turned away into
  the ledger and the outbox;
- a connection the receiver closed while it was idle is replaced before the next
  request, which is delivered inline.
"""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, signing
from wove_adapters.worker import sender


class _Receiver:
    """Answers POSTs with 200 ``{}``: the first after ``first_delay`` seconds, the rest at
    once; with ``hang_up``, it closes the connection after each answer without saying so
    (as a server whose keep-alive timeout ran out does). ``posts`` counts requests."""

    def __init__(self, first_delay: float = 0.0, hang_up: bool = False) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                if receiver.posts == 1:
                    time.sleep(first_delay)
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                self.wfile.flush()
                if hang_up:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.posts = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.path = payload_mod.ReturnPath(
            kind="http", url=f"http://127.0.0.1:{self.server.server_address[1]}/wove/events/t")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[_Receiver]]:
    made: list[_Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _event() -> frames.TaskResult:
    return frames.TaskResult(run_id=f"t:{uuid.uuid4().hex}", task_id="t",
                             result=payload_mod.dumps(42))


def test_a_try_behind_a_late_answer_waits_for_the_connection(
    receivers: list[_Receiver],
) -> None:
    receiver = _Receiver(first_delay=0.3)
    receivers.append(receiver)
    key_id = signing.KEYRING.generate()
    first = _event()
    inflight = sender.try_first(receiver.path, key_id, [first], 0.05)
    assert inflight is not True and inflight is not False  # sent; its answer is late
    late = sender.OUTBOX.put(
        sender.Pending(receiver.path, key_id, [first], label="late", inflight=inflight))
    started = time.monotonic()
    assert sender.try_first(receiver.path, key_id, [_event()], 1.0) is True
    assert time.monotonic() - started < 1.0
    assert late.wait(10) == sender.DELIVERED
    assert receiver.posts == 2


def test_a_connection_closed_while_idle_is_replaced(receivers: list[_Receiver]) -> None:
    receiver = _Receiver(hang_up=True)
    receivers.append(receiver)
    key_id = signing.KEYRING.generate()
    for _ in range(3):
        assert sender.try_first(receiver.path, key_id, [_event()], 1.0) is True
        time.sleep(0.1)  # the receiver has closed the connection by now
    assert receiver.posts == 3
