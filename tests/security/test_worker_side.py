"""A worker never signs for what it could not verify, and no server can hold it.

- a payload signed with a key the worker does not hold (a broker writer's forgery) is
  refused: exit code 2, and nothing is sent to the address the payload names (no signed
  event to harvest, no connection to an attacker's URL);
- a server that drips its answer one byte at a time cannot hold the worker's sender past
  the request's total deadline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, signing
from wove_adapters.testing import tasks
from wove_adapters.worker import sender


class _Listener:
    """A TCP server on loopback that counts connections and answers as told."""

    def __init__(self, drip: bool = False) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.drip = drip
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
                if self.drip:  # a valid start, then one byte every half second, for ever
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    while not self.stop.is_set():
                        conn.sendall(b"X")
                        time.sleep(0.5)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_forged_payload_is_refused_and_nothing_is_sent(tmp_path: Path) -> None:
    listener = _Listener()
    try:
        forger = signing.Keyring()
        key_id = forger.add(os.urandom(32))  # a key the worker does not hold
        envelope = payload_mod.build_envelope(
            adapter="process", run_id="victim:1", task_id="add", attempt=1, func=tasks.add,
            args={"x": 1},
            return_path=payload_mod.ReturnPath(
                url=f"http://127.0.0.1:{listener.port}/wove/events/harvest"
            ),
            delivery={}, key_id=key_id, inline_limit=1 << 20, store_url=None,
        )
        import base64

        import msgspec

        blob = signing.sign(msgspec.msgpack.encode(envelope), key_id, keyring=forger)
        text = payload_mod.PAYLOAD_PREFIX + base64.urlsafe_b64encode(
            signing.encode_blob(blob)).decode()
        path = tmp_path / "payload"
        path.write_text(text)
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "wove_adapters.worker", "--payload-file", str(path)],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "WOVE_ADAPTERS_HOME": str(tmp_path / "home")},
        )
        time.sleep(0.5)  # anything sent in the background would have connected by now
        assert result.returncode == 2, result.stderr
        assert "payload refused" in result.stderr
        assert listener.connections == 0, "the worker contacted the address of a forged payload"
        assert time.monotonic() - started < 30
    finally:
        listener.close()


def test_a_dripping_server_cannot_hold_the_worker() -> None:
    listener = _Listener(drip=True)
    try:
        destination = sender._destination(payload_mod.ReturnPath(
            url=f"http://127.0.0.1:{listener.port}/wove/events/slow"
        ))
        key_id = signing.KEYRING.add(b"drip-test-key")
        data = signing.encode_blob(sender.sign_events(
            [frames.Heartbeat(run_id="r:drip", task_id="t")], key_id))
        outcome: list[BaseException | None] = []

        def post() -> None:
            try:
                destination.attempt(data, timeout=2.0)
                outcome.append(None)
            except Exception as exc:  # any failure will do, in time
                outcome.append(exc)

        started = time.monotonic()
        thread = threading.Thread(target=post, daemon=True)
        thread.start()
        thread.join(10)
        took = time.monotonic() - started
        assert not thread.is_alive(), "a dripping server held the sender past 10 s"
        assert outcome[0] is not None, "a dripping answer was taken as delivered"
        assert took < 4.0, f"a dripping server held the sender {took:.1f}s (deadline 2 s)"
    finally:
        listener.close()
