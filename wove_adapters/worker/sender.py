"""The worker's way back: signed event delivery that never holds a worker slot.

Synchronous on purpose. A worker process is usually a plain process (a forked RQ
work-horse, a Celery prefork child, a batch job): starting an event loop thread and an
async HTTP session in each one cost more than the task (measured: ~6 ms CPU per forked RQ
job). One keep-alive connection per destination per process, guarded by a lock held for
one request at a time, costs one request per event batch: ``_Plain`` for ``http://``
receivers (a request written in one piece, the answer read with one or two ``recv``),
``http.client`` for ``https://``.

A terminal event gets one inline try (``try_first``) that waits at most ``ACK_GRACE``
for the caller's answer to start. A caller that answers within it costs the task nothing
more (the slot was held for one request, as a backend's own result write holds it). If
it does not (gone, down, slow, paused), the outcome is recorded first (the run's ledger,
and the backend's own state: see ``worker.runner.deliver_terminals``) and the task's slot
is free before the acknowledgement; the event goes to the process's ``OUTBOX``: one
daemon thread that reads the answer still on its way, or retries in the background,
bounded by attempts and total time, and calls the event's fallback (the ledger) when it
gives up. So a caller that went away costs the next task nothing, and a worker killed
once its slot is free loses no outcome.

Bounds, from the payload (``executor_config``: ``worker_retry_seconds``,
``worker_retry_attempts``, ``worker_exit_flush_seconds``) or the worker's environment
(``WOVE_ADAPTERS_RETRY_SECONDS``, default 120; ``WOVE_ADAPTERS_RETRY_ATTEMPTS``, default
40; ``WOVE_ADAPTERS_EXIT_FLUSH_SECONDS``, default 10). A process that exits right after
its task (``python -m wove_adapters.worker``, an RQ work-horse, interpreter exit) flushes
first: every pending event is delivered, recorded by its fallback, or out of budget
before it exits.
Each attempt is signed afresh (new nonce and timestamp), so a retry is never refused as a
replay and never ages out of the receiver's window; a duplicate terminal event is dropped
by the receiver.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import heapq
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from wove_adapters.core import signing
from wove_adapters.core.codec import sign_events
from wove_adapters.core.envelope import ReturnPath
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.frames import WireEvent

_T = TypeVar("_T")


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


RETRY_SECONDS = _env_float("WOVE_ADAPTERS_RETRY_SECONDS", 120.0)
RETRY_ATTEMPTS = int(_env_float("WOVE_ADAPTERS_RETRY_ATTEMPTS", 40))
EXIT_FLUSH_SECONDS = _env_float("WOVE_ADAPTERS_EXIT_FLUSH_SECONDS", 10.0)
HEARTBEAT_BUDGET = 5.0
# How long a finished task waits for the caller to start answering the first try of its
# terminal event before it records the outcome (``worker.runner``) and frees its slot. A
# live caller answers a keep-alive POST in well under a millisecond when idle; under a
# burst of 1,000 on 2 cores, 5 ms left a few percent of a burst's answers late and 20
# ms almost none (measured on Celery+Redis, see benchmarks/FINDINGS.md). Recording then
# costs a ledger write and a backend state write, so rare is what we want.
ACK_GRACE = _env_float("WOVE_ADAPTERS_ACK_GRACE", 0.02)
# An inline try (a heartbeat's, or the sending of a terminal event's first try): a live
# caller answers in milliseconds; a refused connection (the caller is gone) is handed to
# the outbox at once, and a caller that does not take the request (paused, overloaded, a
# black-holed network) costs the task's slot at most INLINE_BUDGET: each socket operation
# of the inline try is bounded by it, and the try never waits behind the outbox's own
# (longer) request to the same destination.
INLINE_BUDGET = 1.0
INLINE_TIMEOUT = INLINE_BUDGET
BACKGROUND_TIMEOUT = 30.0
MAX_BACKOFF = 5.0
MAX_PENDING = 10_000  # beyond this, new events go straight to their fallback
# The receiver's answer to a valid batch for runs it does not follow (callbacks.receiver).
UNKNOWN_RUN_STATUS = 404
_MAX_ANSWER = 64 * 1024  # a receiver's answer is small; never read more than this
_PERMANENT = {400, 401, 403, 404, 405, 413, 415, 422}


class _Busy(Exception):
    """The destination's connection is in use past the caller's wait (see attempt)."""


class DeliveryFailed(Exception):
    """The destination refused the events or stayed unreachable past the retry budget."""


class UnknownRunError(PayloadError):
    """The receiver is up but follows none of these runs (its caller restarted on the same
    port and token, or the run ended there): not delivered, and retrying cannot help. A
    terminal event then goes to the run's ledger at once; a heartbeat is simply dropped."""

    def __init__(self, url: str, run_ids: list[str]) -> None:
        self.run_ids = run_ids
        super().__init__(
            f"the receiver at {url} follows no run {', '.join(run_ids[:3])}"
            f"{' ...' if len(run_ids) > 3 else ''} (its caller restarted or let the run go)"
        )


def _unknown_runs(body: bytes) -> list[str]:
    """The run ids a receiver's ``404 {"unknown": [...]}`` answer lists (none for a 404
    that means something else, such as an unknown callback token)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return []
    found = answer.get("unknown") if isinstance(answer, dict) else None
    return [str(run_id) for run_id in found] if isinstance(found, list) else []


# Runs the caller cancelled while they waited inside a chunk (see ``worker.chunks``): a
# receiver names them in its answer to any batch of the same chunk (``{"skip": [...]}``),
# and the chunk runner never starts them. Bounded: oldest names go first.
_CANCELLED: dict[str, None] = {}
_CANCELLED_MAX = 10_000


def cancelled(run_id: str) -> bool:
    """Whether a receiver said the caller cancelled this run (it must not start)."""
    return run_id in _CANCELLED


def _note_cancelled(body: bytes) -> None:
    try:
        answer = json.loads(body)
    except ValueError:
        return
    found = answer.get("skip") if isinstance(answer, dict) else None
    for run_id in found if isinstance(found, list) else []:
        _CANCELLED[str(run_id)] = None
    while len(_CANCELLED) > _CANCELLED_MAX:
        _CANCELLED.pop(next(iter(_CANCELLED)))


class _Watchdog:
    """One thread that cuts requests past their total deadline (a thread per request,
    as ``threading.Timer`` would start, costs more than a short task's whole POST)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._live: set[int] = set()
        self._next = 0
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, cut: Callable[[], None]) -> int:
        with self._cond:
            self._next += 1
            token = self._next
            heapq.heappush(self._heap, (deadline, token, cut))
            self._live.add(token)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="wove-adapters-deadlines", daemon=True
                )
                self._thread.start()
            elif self._heap[0][1] == token:
                self._cond.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._live.discard(token)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)  # disarmed: drop it
                if not self._heap:
                    self._cond.wait(5.0)
                    continue
                deadline, token, cut = self._heap[0]
                left = deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                heapq.heappop(self._heap)
                self._live.discard(token)
            cut()


_WATCHDOG = _Watchdog()


class _Flag:
    """A flag one thread sets and another reads after the fact (no waiting: a
    ``threading.Event`` per request, with its lock and condition, cost more)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


class _Answer:
    """A receiver's answer: its status and (at most ``_MAX_ANSWER`` of) its body."""

    __slots__ = ("body", "status")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body

    def read(self, limit: int) -> bytes:
        return self.body[:limit]


class _Plain:
    """A keep-alive HTTP/1.1 connection to a plain ``http://`` receiver, with the part of
    ``http.client.HTTPConnection`` the sender uses (``sock``, ``timeout``, ``request``,
    ``getresponse``, ``close``).

    Profiled in Taskiq and ARQ workers, ``http.client`` spent most of a terminal event's
    request building the request line by line and parsing the answer's headers through
    ``email.parser``: 60% of the way back's CPU. The receiver's answers are small JSON
    with a ``Content-Length``; this writes the request in one ``sendall`` and reads the
    answer with as few ``recv`` calls as it arrives in, parsed by ``httptools`` (llhttp).
    A connection the receiver closed while it was idle (its keep-alive timeout) is
    noticed before the request is written, and a fresh one is opened instead of failing
    the request. Importing it costs nothing
    (``http.client`` pulls in ``email`` and ``ssl``: a quarter of a one-task worker's
    start, see docs/benchmarks.md)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._head = (f"Host: {host}:{port}\r\nUser-Agent: wove-adapters\r\n").encode("ascii")

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        return sock

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> None:
        sock = self.sock
        if sock is not None and _readable(sock, 0.0):
            # Idle, yet readable: the receiver closed it (or sent what nobody asked for).
            self.close()
            sock = None
        if sock is None:
            sock = self._connect()
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\n".encode("latin-1") + self._head
            + f"{lines}Content-Length: {len(body)}\r\n\r\n".encode("latin-1") + body
        )

    def getresponse(self) -> _Answer:
        """Read the answer (parsed by ``httptools``, llhttp's parser); the connection
        stays open unless the receiver ends it or the answer is larger than
        ``_MAX_ANSWER`` (it is cut there, and the connection with it)."""
        import httptools

        sock = self.sock
        if sock is None:
            raise ConnectionError("not connected")
        answer = _AnswerReader()
        parser = httptools.HttpResponseParser(answer)
        answer.parser = parser
        try:
            while not answer.done:
                data = sock.recv(65536)
                if not data:
                    if answer.status and answer.until_close:  # a body ended by the close
                        answer.keep = False
                        break
                    raise ConnectionError("the receiver closed the connection mid-answer")
                parser.feed_data(data)
                if answer.size > _MAX_ANSWER:
                    answer.keep = False
                    break
        except httptools.HttpParserError as exc:
            self.close()
            raise ConnectionError(f"not an HTTP answer from the receiver: {exc}") from exc
        except BaseException:
            self.close()
            raise
        if not answer.keep:
            self.close()
        return _Answer(answer.status, b"".join(answer.body)[:_MAX_ANSWER])

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


class _AnswerReader:
    """``httptools`` callbacks for one answer: its status, whether the connection stays
    open, and its body up to just past ``_MAX_ANSWER``. An interim (1xx) answer is
    skipped: the real one follows on the same connection."""

    __slots__ = ("body", "done", "keep", "parser", "size", "status", "until_close")

    def __init__(self) -> None:
        self.parser: Any = None
        self.body: list[bytes] = []
        self.size = 0
        self.status = 0
        self.keep = False
        self.done = False
        self.until_close = False

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep = self.parser.should_keep_alive()
        # No length and not chunked: the body runs to the close (HTTP/1.0 style).
        self.until_close = not self.keep

    def on_body(self, data: bytes) -> None:
        if self.size <= _MAX_ANSWER:
            self.body.append(data)
            self.size += len(data)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self.body.clear()
            self.size = self.status = 0
            return
        self.done = True


_Connection = Any  # _Plain, or http.client.HTTPSConnection for https receivers


def _refused(exc: BaseException) -> bool:
    """A refused connection: nobody listens there any more (the caller went away)."""
    return isinstance(exc, ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED
    )


class _Destination:
    """One receiver (or drop box): a keep-alive connection, used one request at a time."""

    def __init__(self, return_path: ReturnPath) -> None:
        self.return_path = return_path
        self.lock = threading.Lock()
        self.conn: _Connection | None = None
        self.redis: Any = None
        # Until then, inline tries skip this destination: its last request failed and the
        # outbox is retrying it (a caller that went away must not cost every task a try).
        self.down_until = 0.0
        # The last failure was a refused connection: nobody listens there any more (the
        # caller's process is gone), so a process about to exit need not linger for it.
        self.refused = False
        # When the request in progress started (0: none): one that has run longer than an
        # inline budget means a slow caller, and inline tries do not queue behind it.
        self.request_started = 0.0
        # The lock is held for a request in flight (``_InFlight``), not by a thread: only
        # the outbox's reading of its answer frees it, so the outbox never waits for it.
        self.parked = False
        parsed = urllib.parse.urlsplit(return_path.url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (443 if self._https else 80)
        self._path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")

    def attempt(
        self, data: bytes, timeout: float, *, deadline: float | None = None,
        wait: float | None = None, grace: float | None = None,
    ) -> _InFlight | None:
        """One request under the lock. Raises PayloadError when refused for good (bad
        signature, unknown token: retrying cannot help), any other error otherwise.
        ``deadline`` (monotonic): the whole attempt, waiting for the connection included,
        ends by then; ``_Busy`` if another request holds the connection until then (the
        outbox may be waiting out a slow caller). ``wait``: at most this long for the
        connection instead. ``grace``: once the request is sent, wait this long for the
        answer to start; if it has not, return the request in flight (the lock stays
        held until its ``finish``), else None (answered)."""
        if wait is None:
            wait = -1.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not self.lock.acquire(timeout=wait):
            raise _Busy(f"the connection to {self.describe()} is busy")
        self.request_started = time.monotonic()
        if deadline is not None:
            left = deadline - self.request_started
            if left < 0.05:
                self.release()
                raise _Busy(f"the connection to {self.describe()} was busy")
            timeout = min(timeout, left)
        inflight = None
        try:
            inflight = self.noting(lambda: self._once(data, timeout, grace))
            self.parked = inflight is not None
            return inflight
        finally:
            if inflight is None:
                self.release()

    def noting(self, step: Callable[[], _T]) -> _T:
        """Run one step of a request: a failure (other than a refusal for good) drops
        the connection and notes whether it was refused; success clears that note."""
        try:
            result = step()
        except PayloadError:
            raise
        except Exception as exc:
            self._reset()
            self.refused = _refused(exc)
            raise
        self.refused = False
        return result

    def release(self) -> None:
        """The request is over: the connection is free for the next one."""
        self.request_started = 0.0
        self.parked = False
        self.lock.release()

    def slow(self, now: float) -> bool:
        """A request has been waiting on this destination for longer than an inline try
        may take: the caller is slow or gone, and the outbox is already on it."""
        started = self.request_started
        return bool(started) and now - started > INLINE_BUDGET

    def deliver(self, data_for: Callable[[], bytes], budget: float) -> None:
        """Retry with capped exponential backoff for ``budget`` seconds (heartbeats and
        one-off reports); the lock is never held while waiting between tries."""
        deadline = time.monotonic() + budget
        delay = 0.05
        while True:
            try:
                self.attempt(data_for(), timeout=min(BACKGROUND_TIMEOUT, max(budget, 1.0)))
                self.down_until = 0.0
                return
            except PayloadError:
                raise
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise DeliveryFailed(
                        f"could not deliver events to {self.describe()} within "
                        f"{budget:.0f}s: {exc}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def describe(self) -> str:
        if self.return_path.kind == "redis":
            return f"redis {self.return_path.url} {self.return_path.key}"
        return self.return_path.url

    def _once(self, data: bytes, timeout: float, grace: float | None = None) -> _InFlight | None:
        if self.return_path.kind == "redis":
            if self.redis is None:
                import redis

                self.redis = redis.Redis.from_url(
                    self.return_path.url, socket_timeout=timeout, socket_connect_timeout=timeout
                )
            self.redis.rpush(self.return_path.key, data)
            return None
        if self.conn is None:
            if self._https:
                import http.client

                self.conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
            else:
                self.conn = _Plain(self._host, self._port, timeout)
        elif self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        self.conn.timeout = timeout
        conn, deadline = self.conn, time.monotonic() + timeout
        self._bounded(conn, deadline, lambda: conn.request(
            "POST", self._path, body=data, headers={"Content-Type": "application/x-wove-events"},
        ))
        if grace is not None and not _answering(conn, grace):
            return _InFlight(self, conn)
        self.answer(conn, deadline)
        return None

    def _bounded(self, conn: _Connection, deadline: float,
                 step: Callable[[], _T]) -> _T:
        """Run one step of an exchange; the socket timeout bounds each read, this bounds
        the whole exchange, so a server that drips its answer a byte at a time cannot
        hold a worker."""
        expired = _Flag()  # set by the watchdog's thread; a plain flag is enough

        def _cut() -> None:
            expired.set()
            sock = conn.sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        token = _WATCHDOG.arm(deadline, _cut)
        try:
            result = step()
        except Exception:
            if expired.is_set():
                raise TimeoutError(f"{self.describe()} did not answer in time") from None
            raise
        finally:
            _WATCHDOG.disarm(token)
        if expired.is_set():
            raise TimeoutError(f"{self.describe()} did not answer in time")
        return result

    def answer(self, conn: _Connection, deadline: float) -> None:
        """Read the answer to the request sent on ``conn``; raise as ``attempt`` says."""

        def read() -> tuple[int, bytes]:
            response = conn.getresponse()
            return response.status, response.read(_MAX_ANSWER)

        status, body = self._bounded(conn, deadline, read)
        if b'"skip"' in body:
            _note_cancelled(body)
        if status < 300:
            return
        if status == UNKNOWN_RUN_STATUS:
            unknown = _unknown_runs(body)
            if unknown:
                raise UnknownRunError(self.return_path.url, unknown)
        text = body[:200].decode("utf-8", "replace")
        if status in _PERMANENT:
            raise PayloadError(f"receiver refused events: HTTP {status} {text}")
        raise ConnectionError(f"receiver answered HTTP {status} {text}")

    def _reset(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


    def close(self) -> None:
        # Never wait behind a request to a caller that does not answer (the outbox's
        # may take BACKGROUND_TIMEOUT): a process about to exit closes what is idle, and
        # the operating system closes the rest with the process.
        if not self.lock.acquire(timeout=0.5):
            return
        try:
            self._reset()
            if self.redis is not None:
                client, self.redis = self.redis, None
                try:
                    client.close()
                except Exception:  # closing at exit is best effort
                    pass
        finally:
            self.lock.release()


def _answering(conn: _Connection, grace: float) -> bool:
    """Whether the answer to the request just sent on ``conn`` starts within ``grace``
    seconds (or the connection broke: reading it then raises at once)."""
    sock = conn.sock
    pending = getattr(sock, "pending", None)  # TLS: bytes already decrypted
    if sock is None or (pending is not None and pending()):
        return True
    return _readable(sock, grace)


def _readable(sock: Any, wait: float) -> bool:
    """Whether ``sock`` has something to read (or was closed) within ``wait`` seconds."""
    if sock.fileno() < 1024:  # select's limit; one call, cheaper than a poll object
        return bool(select.select([sock], [], [], wait)[0])
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(wait * 1000.0))


class _InFlight:
    """A request sent whose answer did not start within the sender's grace: the outbox
    reads it (``finish``). Its destination's lock stays held until then, so nothing else
    is written on the connection meanwhile; inline tries see the destination slow."""

    def __init__(self, destination: _Destination, conn: _Connection) -> None:
        self.destination = destination
        self.conn = conn

    def finish(self, timeout: float) -> None:
        """Read the answer (``timeout`` seconds at most); raises as ``attempt`` does."""
        destination = self.destination
        if self.conn.sock is not None:
            self.conn.sock.settimeout(timeout)
        try:
            destination.noting(
                lambda: destination.answer(self.conn, time.monotonic() + timeout))
        finally:
            destination.release()

    def abandon(self) -> None:
        """Drop the request without its answer (the connection goes with it)."""
        self.destination._reset()
        self.destination.release()


_destinations: dict[tuple[str, str, str], _Destination] = {}
_lock = threading.Lock()
_pid = os.getpid()
_closer_registered = False


def _destination(return_path: ReturnPath) -> _Destination:
    global _pid, _closer_registered
    ident = (return_path.kind, return_path.url, return_path.key)
    with _lock:
        if _pid != os.getpid():  # a forked child must not share its parent's sockets
            _destinations.clear()
            _pid = os.getpid()
        found = _destinations.get(ident)
        if found is None:
            found = _destinations[ident] = _Destination(return_path)
            if not _closer_registered:
                _closer_registered = True
                import atexit

                atexit.register(close_connections)
        return found


def close_connections() -> None:
    """Close this process's connections to callers (a worker about to exit; also at
    interpreter exit, so no socket is left for the garbage collector to warn about)."""
    with _lock:
        found = list(_destinations.values()) if _pid == os.getpid() else []
    for destination in found:
        destination.close()


def post(
    return_path: ReturnPath, key_id: str, events: list[WireEvent], *, budget: float = RETRY_SECONDS
) -> None:
    """Sign and deliver events, retrying for ``budget`` seconds; returns once acknowledged,
    raises DeliveryFailed (or PayloadError when refused for good). Blocks: terminal events
    use ``try_post`` + ``OUTBOX`` instead."""
    if return_path.kind == "native":
        # The backend carries the outcome back itself (e.g. a Temporal workflow result,
        # see AdapterTransport.return_path): there is nowhere to send events to.
        return
    _destination(return_path).deliver(
        lambda: signing.encode_blob(sign_events(events, key_id)), budget
    )


def _inline_destination(
    return_path: ReturnPath, *, behind_late: bool = False
) -> _Destination | None:
    """The destination an inline try may use now; None when its last request failed,
    a request is in flight there (the caller was slow to answer it), or one has been
    waiting on it past an inline budget: the outbox is on it. ``behind_late``: a request
    in flight whose answer is only late (under an inline budget: the outbox is reading
    it) does not turn the try away; it may wait for the connection (``try_first``)."""
    destination = _destination(return_path)
    now = time.monotonic()
    if destination.down_until > now or (destination.parked and not behind_late):
        return None
    if destination.slow(now):
        destination.down_until = now + 1.0
        return None
    return destination


def try_post(
    return_path: ReturnPath,
    key_id: str,
    events: list[WireEvent],
    *,
    budget: float = INLINE_BUDGET,
) -> bool:
    """The inline try: True once acknowledged; False (at once) when the destination is
    known down or refuses connections, or after ``budget`` seconds of other trouble.
    Raises PayloadError when the destination refuses the events for good."""
    if return_path.kind == "native":
        return True
    destination = _inline_destination(return_path)
    if destination is None:
        return False
    deadline = time.monotonic() + budget
    delay = 0.05
    while True:
        try:
            destination.attempt(
                signing.encode_blob(sign_events(events, key_id)),
                timeout=INLINE_TIMEOUT,
                deadline=deadline,
            )
            destination.down_until = 0.0
            return True
        except PayloadError:
            raise
        except _Busy:  # the outbox is mid-request there: it takes this event too
            destination.down_until = time.monotonic() + 1.0
            return False
        except Exception as exc:
            if _refused(exc) or time.monotonic() + delay > deadline:
                destination.down_until = time.monotonic() + 1.0
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.4)


def try_first(
    return_path: ReturnPath, key_id: str, events: list[WireEvent], grace: float
) -> bool | _InFlight:
    """The first try of terminal events, from the task's thread: True once acknowledged
    within ``grace`` seconds; the request in flight when it was sent but its answer had
    not started by then (the outbox reads it: ``Pending.inflight``); False at once when
    the destination is known down or slow, False after ``grace`` when its connection
    stayed busy that long (a request in flight there whose answer is late, or the
    outbox mid-request), or when the try failed. Raises PayloadError when refused for
    good.

    Busy is not down: in a burst the caller may answer one request a little late
    (profiled on ARQ workers running chunks: turning every try away while one answer
    was late sent a third of the worker's CPU into recording outcomes in the ledger,
    each one later delivered again by the outbox). A try waits up to its grace for the
    connection instead; only a failure skips the destination for a second."""
    if return_path.kind == "native":
        return True
    destination = _inline_destination(return_path, behind_late=True)
    if destination is None:
        return False
    try:
        inflight = destination.attempt(
            signing.encode_blob(sign_events(events, key_id)), timeout=INLINE_TIMEOUT,
            wait=grace, grace=grace,
        )
    except PayloadError:
        raise
    except _Busy:  # still in use after the grace: the outbox takes this one too
        return False
    except Exception:  # refused, reset, timed out: the outbox retries it
        destination.down_until = time.monotonic() + 1.0
        return False
    if inflight is None:
        destination.down_until = 0.0
        return True
    return inflight


# ---------------------------------------------------------------- the outbox


DELIVERED = "delivered"
RECORDED = "recorded"  # not delivered, but the fallback (the ledger) holds it
LOST = "lost"  # neither: the run's outcome is gone (logged on the worker)


@dataclass(eq=False)
class Pending:
    """One event the caller has not acknowledged yet, owned by the outbox."""

    return_path: ReturnPath
    key_id: str
    events: list[WireEvent]
    label: str
    retry_seconds: float = RETRY_SECONDS
    retry_attempts: int = RETRY_ATTEMPTS
    exit_flush_seconds: float = EXIT_FLUSH_SECONDS
    # Records the event somewhere durable (the run's ledger): called once the outbox
    # takes the event (so a worker killed meanwhile loses nothing), again at give-up if
    # that failed. Returns True when recorded.
    fallback: Callable[[], bool] | None = None
    created: float = field(default_factory=time.monotonic)
    attempts: int = 0
    next_at: float = 0.0
    recorded: bool = False
    # Held while a thread records it: one writer at a time, no double write.
    record_lock: threading.Lock = field(default_factory=threading.Lock)
    result: str | None = None
    settled: threading.Event = field(default_factory=threading.Event)
    safe: threading.Event = field(default_factory=threading.Event)  # delivered or recorded
    # The first try (``try_first``), sent, its answer not started within the grace: the
    # outbox reads it. Its destination's connection is held for it until then.
    inflight: _InFlight | None = None
    last_error: str = ""

    @property
    def deadline(self) -> float:
        return self.created + self.retry_seconds

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until delivered, recorded for good, or out of budget; the result."""
        self.settled.wait(timeout)
        return self.result

    def wait_safe(self, timeout: float | None = None) -> bool:
        """Block until the event is delivered or durably recorded (what a process must
        see before it exits), or given up; True if it is safe."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.safe.is_set() and not self.settled.is_set():
            if end is not None and time.monotonic() >= end:
                break
            self.safe.wait(0.05)
        return self.safe.is_set()


class Outbox:
    """Per-process background delivery: one daemon thread, bounded work per event, and
    one more that records each new event in its ledger as it arrives (a few ms each), so
    a recording never waits behind a request to a slow caller (up to BACKGROUND_TIMEOUT)
    and a process about to exit is safe as soon as its outcomes are recorded."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._items: list[Pending] = []
        self._thread: threading.Thread | None = None
        self._records: queue.SimpleQueue[Pending] = queue.SimpleQueue()
        self._recorder: threading.Thread | None = None
        self._pid = os.getpid()
        self._exit_hook = False
        self.stats: dict[str, int] = {DELIVERED: 0, RECORDED: 0, LOST: 0, "queued": 0}

    def _after_fork(self) -> None:
        # The parent keeps retrying its own events; a child starts empty.
        self._cond = threading.Condition()
        self._items = []
        self._thread = None
        self._records = queue.SimpleQueue()
        self._recorder = None
        self._pid = os.getpid()
        self._exit_hook = False

    def record(self, item: Pending, *, wait: bool = True) -> bool:
        """Record ``item`` with its fallback now, in this thread, unless it is recorded
        already (if another thread is recording it, wait for that one, or with ``wait``
        false, leave it to it). True when it is recorded."""
        if item.recorded or item.fallback is None:
            return item.recorded
        if not item.record_lock.acquire(blocking=wait):
            return item.recorded
        try:
            if not item.recorded:
                item.recorded = self._record(item)
                if item.recorded:
                    item.safe.set()
        finally:
            item.record_lock.release()
        return item.recorded

    def _record_loop(self) -> None:
        while True:
            self.record(self._records.get())

    def put(self, item: Pending) -> Pending:
        """Take over an event; returns at once."""
        if self._pid != os.getpid():
            self._after_fork()
        with self._cond:
            if len(self._items) >= MAX_PENDING:
                full = True
            else:
                full = False
                self._items.append(item)
                self.stats["queued"] += 1
                self._ensure_thread()
                if item.fallback is not None and not item.recorded:
                    self._records.put(item)
                    if self._recorder is None or not self._recorder.is_alive():
                        self._recorder = threading.Thread(
                            target=self._record_loop, daemon=True, name="wove-outbox-ledger"
                        )
                        self._recorder.start()
                self._cond.notify()
        if full:  # no unbounded memory: record it now, no retries
            inflight, item.inflight = item.inflight, None
            if inflight is not None:
                inflight.abandon()
            self._settle(item, RECORDED if self.record(item) else LOST, "outbox full")
        return item

    def pending(self) -> int:
        with self._cond:
            return len(self._items)

    def flush(
        self, timeout: float | None = None, *, linger: bool = False, refused_too: bool = False
    ) -> bool:
        """Wait until every pending event is safe (delivered, or recorded in its ledger)
        or out of budget, up to ``timeout`` seconds. With ``linger``, a recorded event
        also gets up to its ``exit_flush_seconds`` to reach a caller that may be alive but
        slow (not one whose port refuses connections, which is usually gone, unless
        ``refused_too``). True when nothing is left unsafe."""
        start = time.monotonic()
        end = None if timeout is None else start + timeout
        while True:
            with self._cond:
                items = list(self._items)
            now = time.monotonic()
            waiting = [
                item
                for item in items
                if not item.safe.is_set()
                or (
                    linger
                    and now - start < item.exit_flush_seconds
                    and (refused_too or not _destination(item.return_path).refused)
                )
            ]
            if not waiting or (end is not None and now >= end):
                return all(item.safe.is_set() for item in items)
            waiting[0].settled.wait(0.05)

    # ------------------------------------------------------------ the thread

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="wove-outbox")
            self._thread.start()
            if not self._exit_hook:
                self._exit_hook = True
                _register_exit_flush(self)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                now = time.monotonic()
                # Requests in flight first: each holds its destination's connection.
                due = sorted((item for item in self._items if item.next_at <= now),
                             key=lambda item: item.inflight is None)
                if not due:
                    wake = min(item.next_at for item in self._items)
                    self._cond.wait(max(wake - now, 0.005))
                    continue
            failed: set[int] = set()
            for item in due:
                destination = _destination(item.return_path)
                if id(destination) in failed:  # it just failed: try again next round
                    item.next_at = time.monotonic() + 0.05
                    continue
                if not self._work(item, destination):
                    failed.add(id(destination))

    def _work(self, item: Pending, destination: _Destination) -> bool:
        """One step for one event; False when its destination failed this round."""
        if item.attempts == 0:
            self.record(item, wait=False)  # the recorder thread may be on it already
        inflight, item.inflight = item.inflight, None
        if inflight is None and destination.parked:  # its request in flight goes first
            item.next_at = time.monotonic() + 0.005
            return True
        item.attempts += 1
        try:
            if inflight is not None:  # the first try's answer is still on its way
                inflight.finish(BACKGROUND_TIMEOUT)
            else:
                # Never wait for a connection without bound: a request parked there
                # after this check is only freed by this thread.
                destination.attempt(
                    signing.encode_blob(sign_events(item.events, item.key_id)),
                    timeout=BACKGROUND_TIMEOUT, wait=INLINE_BUDGET + 0.5,
                )
        except _Busy:  # not an attempt: try again shortly
            item.attempts -= 1
            item.next_at = time.monotonic() + 0.05
            return True
        except PayloadError as exc:  # refused for good: retrying cannot help
            item.last_error = str(exc)
            self._give_up(item)
            return True
        except Exception as exc:
            item.last_error = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            if item.attempts >= item.retry_attempts or now >= item.deadline:
                destination.down_until = now + 1.0
                self._give_up(item)
            else:
                backoff = min(0.1 * 2 ** (item.attempts - 1), MAX_BACKOFF)
                item.next_at = min(now + backoff, item.deadline)
                # Inline tries skip this destination until the outbox has tried again:
                # while it keeps failing, no task pays for it in its slot.
                destination.down_until = max(now + 1.0, item.next_at + 0.5)
            return False
        destination.down_until = 0.0
        self._settle(item, DELIVERED)
        return True

    def _record(self, item: Pending) -> bool:
        if item.fallback is None:
            return False
        try:
            return bool(item.fallback())
        except Exception as exc:  # the fallback reports its own trouble
            item.last_error = f"{type(exc).__name__}: {exc}"
            return False

    def _give_up(self, item: Pending) -> None:
        self.record(item)
        result = RECORDED if item.recorded else LOST
        if result == LOST:
            print(
                f"wove-adapters worker: the outcome of {item.label} was not delivered to "
                f"{_destination(item.return_path).describe()} after {item.attempts} attempts "
                f"in {time.monotonic() - item.created:.1f}s ({item.last_error}) and no "
                f"shareable ledger holds it: it is lost. Configure a sqlite/redis/postgres "
                f"ledger the workers can reach, or a longer worker_retry_seconds.",
                file=sys.stderr,
            )
        self._settle(item, result)

    def _settle(self, item: Pending, result: str, why: str = "") -> None:
        item.result = result
        if result in (DELIVERED, RECORDED):
            item.safe.set()
        self.stats[result] += 1
        with self._cond:
            if item in self._items:
                self._items.remove(item)
        item.settled.set()


def _register_exit_flush(outbox: Outbox) -> None:
    """Flush at interpreter exit, before the standard library joins threads: a worker
    process that ends after its task still delivers or records what it holds (bounded by
    each event's retry budget; a recorded event does not hold the exit)."""

    def _flush() -> None:
        if outbox._pid == os.getpid() and outbox.pending():
            outbox.flush(None)

    register = getattr(threading, "_register_atexit", None)
    try:
        if register is not None:
            register(_flush)
            return
    except RuntimeError:  # already shutting down: nothing to register with
        return
    import atexit

    atexit.register(_flush)


OUTBOX = Outbox()
os.register_at_fork(after_in_child=OUTBOX._after_fork)


_pool: concurrent.futures.ThreadPoolExecutor | None = None


def send(return_path: ReturnPath, key_id: str, event: WireEvent) -> concurrent.futures.Future[None]:
    """Deliver one event from a worker thread; the future resolves when acknowledged."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="wove-sender")
    return _pool.submit(post, return_path, key_id, [event])


async def asend(return_path: ReturnPath, key_id: str, event: WireEvent) -> None:
    """Deliver one event from async code without blocking its loop."""
    import asyncio

    await asyncio.to_thread(post, return_path, key_id, [event])
