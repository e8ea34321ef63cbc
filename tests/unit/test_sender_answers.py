"""The worker's plain-http connection reads whatever well-formed answer a receiver (or a
proxy in front of it) sends, and refuses what is not HTTP with a ConnectionError."""

from __future__ import annotations

import socket
import threading

import pytest

from wove_adapters.worker.sender import _Plain


def _serve(answer: bytes, close: bool) -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def one() -> None:
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(answer)
            if not close:
                conn.recv(1)  # hold the connection until the client closes it

    thread = threading.Thread(target=one, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.parametrize(("answer", "status", "body", "kept"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"ok\":true}", 200, b'{"ok":true}', True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
     200, b"ok", True),
    (b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
     409, b"abcde", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the close", 200, b"until the close", False),
])
def test_answers_are_read_whole(answer: bytes, status: int, body: bytes, kept: bool) -> None:
    server, thread = _serve(answer, close=not kept)
    port = server.getsockname()[1]
    conn = _Plain("127.0.0.1", port, 5.0)
    try:
        conn.request("POST", "/wove/events/x", b"payload", {"Content-Type": "x"})
        got = conn.getresponse()
        assert (got.status, got.read(1 << 16)) == (status, body)
        assert (conn.sock is not None) is kept
    finally:
        conn.close()
        thread.join(5)
        server.close()


def test_what_is_not_http_is_a_connection_error() -> None:
    server, thread = _serve(b"SSH-2.0-OpenSSH_9.2\r\n\r\n", close=True)
    conn = _Plain("127.0.0.1", server.getsockname()[1], 5.0)
    try:
        conn.request("POST", "/wove/events/x", b"payload", {})
        with pytest.raises(ConnectionError, match="not an HTTP answer"):
            conn.getresponse()
        assert conn.sock is None
    finally:
        conn.close()
        thread.join(5)
        server.close()
