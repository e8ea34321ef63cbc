"""Issue 13, item 4: the receiver stays up under abuse.

Each attack runs against the real receiver (``get_receiver`` on the shared loop, where a
Hub's runs meet it), from another process or from raw sockets, and each test counts:
legitimate runs lost 0, 5xx answers 0, tracebacks logged 0, every attacking connection
answered or closed within its bound.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import select
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

from wove_adapters import Hub
from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import frames, signing
from wove_adapters.core import loop as shared_loop
from wove_adapters.testing import tasks

# Opens N connections to HOST:PORT (``idle``: nothing sent; ``declared:LENGTH``: headers
# declaring a body that never comes), says how many it opened, waits for a line on
# stdin, then says how many are still open with no answer and no close.
ATTACKER = textwrap.dedent(
    """
    import socket, sys
    host, port, count, mode, path = sys.argv[1:6]
    port, count = int(port), int(count)
    socks = []
    for _ in range(count):
        try:
            sock = socket.create_connection((host, port), timeout=10)
        except OSError:
            continue
        if mode.startswith("declared:"):
            length = mode.split(":")[1]
            head = f"POST {path} HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: {length}\\r\\n\\r\\n"
            sock.sendall(head.encode())
        socks.append(sock)
    print("opened", len(socks), flush=True)
    sys.stdin.readline()
    silent = answered = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(64)
        except BlockingIOError:
            silent += 1
            continue
        except OSError:
            continue
        if data.startswith(b"HTTP/1.1 5"):
            print("5xx", data[:40], flush=True)
        answered += bool(data)
    print("silent", silent, "answered", answered, flush=True)
    """
)


class Attack:
    """The attacker process: ``open()`` connects, ``report()`` counts what is left."""

    def __init__(self, receiver: CallbackReceiver, count: int, mode: str) -> None:
        path = "/" + receiver.url.split("/", 3)[3]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ATTACKER, receiver.host, str(receiver.port), str(count),
             mode, path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def opened(self) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["opened"], line
        return int(line[1])

    def report(self) -> dict[str, int]:
        out, _ = self.proc.communicate("go\n", timeout=60)
        assert "5xx" not in out, out
        words = out.split()
        return {"silent": int(words[words.index("silent") + 1]),
                "answered": int(words[words.index("answered") + 1])}


def test_idle_connection_flood_locks_no_run_out(
    receiver_for: Callable[..., CallbackReceiver],
    key_id: str,
    round_trip: Callable[[CallbackReceiver, str], bool],
    traceback_log: list[Any],
) -> None:
    """1,100 idle connections (before: every new worker connection failed, and asyncio
    logged ~400,000 EMFILE tracebacks in 15 s with the usual 1024 descriptors)."""
    receiver = receiver_for()
    receiver.header_timeout = 3.0
    receiver.max_connections = 200  # the flood is well past the cap (default 1024 here)
    config = {"callback_token": receiver.token}
    with Hub(environments={"p": {"executor": "process", "executor_config": config}},
             default_environment="p") as hub:
        assert hub.run(tasks.add, 1) == 2
        attack = Attack(receiver, 1100, "idle")
        assert attack.opened() == 1100
        started = time.monotonic()
        lost = sum(not round_trip(receiver, key_id) for _ in range(30))
        futures = [hub.submit(tasks.add, i) for i in range(8)]
        results = [future.result(timeout=60) for future in futures]
        assert (lost, results) == (0, [i + 1 for i in range(8)])
        assert time.monotonic() - started < 30
        time.sleep(receiver.header_timeout + 1.5)
        left = attack.report()
    print(f"idle flood: legit lost {lost}, stats {receiver.stats}, attacker {left}")
    assert left["silent"] == 0  # every idle connection was closed
    closed = receiver.stats["connections_evicted"] + receiver.stats["idle_closed"]
    assert receiver.stats["connections_evicted"] > 0 and closed >= 1100
    assert traceback_log == []


def test_slow_headers_and_slow_bodies_are_cut_off(
    receiver_for: Callable[..., CallbackReceiver],
    key_id: str,
    round_trip: Callable[[CallbackReceiver, str], bool],
) -> None:
    """One byte every 0.2 s (before: never cut off)."""
    receiver = receiver_for()
    receiver.header_timeout = receiver.body_timeout = 1.0
    path = "/" + receiver.url.split("/", 3)[3]

    def drip(prefix: bytes, tail: bytes) -> tuple[float, bytes]:
        started = time.monotonic()
        with socket.create_connection((receiver.host, receiver.port), timeout=10) as sock:
            sock.sendall(prefix)
            sock.settimeout(0.2)
            for byte in tail:
                try:
                    sock.send(bytes([byte]))
                    answer = sock.recv(64)
                    return time.monotonic() - started, answer
                except TimeoutError:
                    continue
                except OSError:
                    return time.monotonic() - started, b""
        return time.monotonic() - started, b"never cut off"

    header_took, header_answer = drip(b"", f"POST {path} HTTP/1.1\r\nX-Pad: {'a' * 100}".encode())
    body_took, body_answer = drip(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n".encode(), b"b" * 200
    )
    print(f"slow headers cut after {header_took:.1f}s ({header_answer[:12]!r}), "
          f"slow body after {body_took:.1f}s ({body_answer[:12]!r})")
    assert header_took < 4 and header_answer in (b"",)
    assert body_took < 4 and body_answer.startswith(b"HTTP/1.1 408")
    assert round_trip(receiver, key_id)


def test_declared_bodies_never_sent_are_answered_and_closed(
    receiver_for: Callable[..., CallbackReceiver],
    key_id: str,
    round_trip: Callable[[CallbackReceiver, str], bool],
    traceback_log: list[Any],
) -> None:
    """300 connections declaring 500 MB, 300 declaring 1 MiB, none sending it (before:
    all 300 of the first kind still open after 40 s)."""
    receiver = receiver_for()
    receiver.body_timeout = 2.0
    huge = Attack(receiver, 300, "declared:500000000")
    small = Attack(receiver, 300, "declared:1048576")
    assert (huge.opened(), small.opened()) == (300, 300)
    assert round_trip(receiver, key_id)
    time.sleep(receiver.body_timeout + 1.5)
    left_huge, left_small = huge.report(), small.report()
    print(f"declared, never sent: 500 MB {left_huge}, 1 MiB {left_small}, {receiver.stats}")
    assert left_huge == {"silent": 0, "answered": 300}  # 413 at once
    assert left_small["silent"] == 0  # 408 after the body timeout
    assert receiver.stats["too_large"] >= 300 and receiver.stats["timed_out"] >= 300
    assert round_trip(receiver, key_id)
    assert traceback_log == []


def _send_big(receiver: CallbackReceiver, size: int, chunked: bool, statuses: list[int]) -> None:
    """One big request. A declared length is answered from the headers alone (413, then
    the receiver closes: its right), so that answer is read before any of the body is
    written: a sender still writing when the connection closes gets a reset and would
    lose the answer it was sent. A chunked sender has nothing to be judged by but its
    bytes: it writes until refused (a reset then counts as 0)."""
    path = "/" + receiver.url.split("/", 3)[3]
    chunk = os.urandom(1 << 20)
    head = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
    try:
        with socket.create_connection((receiver.host, receiver.port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n{head}\r\n\r\n".encode())
            # A receiver that waits for the body says nothing here: it gets the body.
            early = not chunked and select.select([sock], [], [], 5.0)[0]
            if not early:
                for _ in range(size >> 20):
                    sock.sendall(b"100000\r\n" + chunk + b"\r\n" if chunked else chunk)
            answer = sock.recv(64)
    except OSError:  # refused and closed while we were still sending
        statuses.append(0)
        return
    statuses.append(int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0)


def test_large_senders_do_not_starve_legitimate_events(
    receiver_for: Callable[..., CallbackReceiver],
    key_id: str,
    round_trip: Callable[[CallbackReceiver, str], bool],
) -> None:
    """Four 128 MiB senders with a declared length, four chunked (before: legitimate
    round trips 6.6x slower at the median, 219 ms at worst)."""
    receiver = receiver_for()
    statuses: list[int] = []
    senders = [
        threading.Thread(target=_send_big, args=(receiver, 128 << 20, chunked, statuses))
        for chunked in (False, True) * 4
    ]
    for thread in senders:
        thread.start()
    took: list[float] = []
    while any(thread.is_alive() for thread in senders) or len(took) < 10:
        started = time.monotonic()
        assert round_trip(receiver, key_id)
        took.append(time.monotonic() - started)
    for thread in senders:
        thread.join(60)
    took.sort()
    print(f"big senders: {statuses}; legit round trips {len(took)}, median "
          f"{took[len(took) // 2] * 1000:.1f} ms, worst {took[-1] * 1000:.0f} ms")
    assert set(statuses) <= {413, 0} and statuses.count(413) >= 4
    assert not any(500 <= status < 600 for status in statuses)
    assert receiver.stats["accepted"] == len(took)
    # Bounds for a loaded 2-core CI machine: starved, legitimate events would wait for
    # the senders (many seconds each); served, they take milliseconds at the median.
    assert took[len(took) // 2] < 0.5
    assert took[-1] < 8.0


def test_large_bodies_are_verified_off_the_loop(
    receiver_for: Callable[..., CallbackReceiver], key_id: str
) -> None:
    """Forged 60 MiB batches (a valid blob, a wrong HMAC): the shared loop keeps turning
    (before: the HMAC of one such body held it ~120 ms)."""
    receiver = receiver_for(callback_max_body=64 << 20)
    event = frames.TaskResult(run_id="big", task_id="t", attempt=1, result=os.urandom(60 << 20))
    from wove_adapters.core.codec import sign_events

    blob = sign_events([event], key_id)
    forged = signing.encode_blob(
        signing.SignedBlob(blob.key_id, blob.timestamp, blob.nonce, b"\0" * 32, blob.body)
    )
    lags: list[float] = []
    # What verifying one such body costs on this machine now.
    started = time.monotonic()
    hmac.new(os.urandom(32), forged, hashlib.sha256).digest()
    verify_cost = time.monotonic() - started

    ends: list[float] = []  # when each lag sample was taken (time.monotonic)

    async def watch(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.002)
            lags.append(loop.time() - before - 0.002)
            ends.append(time.monotonic())

    stop = shared_loop.run_sync(_event())
    watcher = shared_loop.submit(watch(stop))
    path = "/" + receiver.url.split("/", 3)[3]
    answers = []
    windows = []
    for _ in range(3):
        began = time.monotonic()
        with socket.create_connection((receiver.host, receiver.port), timeout=30) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(forged)}"
                         f"\r\n\r\n".encode() + forged)
            answers.append(sock.recv(12))
        windows.append((began, time.monotonic() + 0.05))
    shared_loop.get_loop().call_soon_threadsafe(stop.set)
    watcher.result(10)
    # The worst stall while each body was handled; verified on the loop, every body
    # stalls it (~120 ms each, quiet machine), so the middle one of three is judged: a
    # stall of a loaded machine's own (another process took the CPU) hits one body, not
    # two. The bound is 80 ms, scaled with what one verification costs right now.
    per_body = sorted(
        max((lag for lag, end in zip(lags, ends, strict=True) if began <= end <= until),
            default=0.0)
        for began, until in windows
    )
    bound = max(0.08, verify_cost * 1.5)
    print(f"60 MiB forged bodies: {answers}, worst loop lag per body "
          f"{[round(lag * 1000) for lag in per_body]} ms (bound {bound * 1000:.0f} ms; one "
          f"verification {verify_cost * 1000:.0f} ms)")
    assert answers == [b"HTTP/1.1 401"] * 3
    assert per_body[1] < bound


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_non_ascii_path_token_is_404(
    receiver_for: Callable[..., CallbackReceiver],
    post_raw: Callable[..., int],
    traceback_log: list[Any],
) -> None:
    """(before: 500, with a traceback: compare_digest refuses non-ASCII text)."""
    receiver = receiver_for()
    found = {
        token: post_raw(receiver, b"x", path=f"/wove/events/{token}")
        for token in ("%C3%A9t%C3%A9", "%FF%FE", "%ED%A0%80", "\u00e9t\u00e9", "%00", "a" * 4000)
    }
    print(f"non-ASCII tokens: {found}, {receiver.stats}")
    # Raw UTF-8 in the request line is refused by the HTTP parser itself (400, or the
    # connection closed); percent-encoded, the token reaches the receiver: 404.
    assert all(status in (0, 400, 404, 431) for status in found.values()), found
    assert [found[t] for t in ("%C3%A9t%C3%A9", "%FF%FE", "%ED%A0%80")] == [404] * 3
    assert traceback_log == []
