"""The worker's way back: signed event delivery over a persistent connection, with retry.

Synchronous on purpose. A worker process is usually a plain process (a forked RQ
work-horse, a Celery prefork child, a batch job): starting an event loop thread and an
async HTTP session in each one cost more than the task (measured: ~6 ms CPU per forked RQ
job). One keep-alive ``http.client`` connection per destination per process, guarded by a
lock, keeps order and costs one request per event batch. A briefly unreachable receiver
is retried with capped exponential backoff for the caller's budget (the terminal event
gets ``WOVE_ADAPTERS_RETRY_SECONDS``, default 120 s; a heartbeat gets a few seconds).
"""

from __future__ import annotations

import concurrent.futures
import http.client
import os
import threading
import time
import urllib.parse
from typing import Any

import msgspec

from wove_adapters.callbacks import signing
from wove_adapters.callbacks.payload import ReturnPath
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.frames import EventBatch, WireEvent

_encoder = msgspec.msgpack.Encoder()
RETRY_SECONDS = float(os.environ.get("WOVE_ADAPTERS_RETRY_SECONDS", "120"))
HEARTBEAT_BUDGET = 5.0
_PERMANENT = {400, 401, 403, 404, 405, 413, 415, 422}


class DeliveryFailed(Exception):
    """The destination refused the events or stayed unreachable past the retry budget."""


def sign_events(events: list[WireEvent], key_id: str) -> signing.SignedBlob:
    return signing.sign(_encoder.encode(EventBatch(events=events, sent_at=time.time())), key_id)


class _Destination:
    def __init__(self, return_path: ReturnPath) -> None:
        self.return_path = return_path
        self.lock = threading.Lock()
        self.conn: http.client.HTTPConnection | None = None
        self.redis: Any = None
        parsed = urllib.parse.urlsplit(return_path.url)
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (443 if self._https else 80)
        self._path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")

    def deliver(self, data: bytes, budget: float) -> None:
        deadline = time.monotonic() + budget
        delay = 0.05
        with self.lock:
            while True:
                try:
                    self._once(data)
                    return
                except PayloadError:
                    raise
                except Exception as exc:  # connection trouble: retry with backoff
                    self._reset()
                    if time.monotonic() + delay > deadline:
                        raise DeliveryFailed(
                            f"could not deliver events to {self.return_path.url} within "
                            f"{budget:.0f}s: {exc}"
                        ) from exc
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)

    def _once(self, data: bytes) -> None:
        if self.return_path.kind == "redis":
            if self.redis is None:
                import redis

                self.redis = redis.Redis.from_url(self.return_path.url)
            self.redis.rpush(self.return_path.key, data)
            return
        if self.conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self.conn = cls(self._host, self._port, timeout=30)
        self.conn.request(
            "POST", self._path, body=data, headers={"Content-Type": "application/x-wove-events"}
        )
        response = self.conn.getresponse()
        text = response.read()[:200].decode("utf-8", "replace")
        if response.status < 300:
            return
        if response.status in _PERMANENT:
            raise PayloadError(f"receiver refused events: HTTP {response.status} {text}")
        raise ConnectionError(f"receiver answered HTTP {response.status} {text}")

    def _reset(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


_destinations: dict[tuple[str, str, str], _Destination] = {}
_lock = threading.Lock()
_pid = os.getpid()


def _destination(return_path: ReturnPath) -> _Destination:
    global _pid
    ident = (return_path.kind, return_path.url, return_path.key)
    with _lock:
        if _pid != os.getpid():  # a forked child must not share its parent's sockets
            _destinations.clear()
            _pid = os.getpid()
        found = _destinations.get(ident)
        if found is None:
            found = _destinations[ident] = _Destination(return_path)
        return found


def post(
    return_path: ReturnPath, key_id: str, events: list[WireEvent], *, budget: float = RETRY_SECONDS
) -> None:
    """Sign and deliver events; returns once acknowledged, raises DeliveryFailed."""
    if return_path.kind == "native":
        # The backend carries the outcome back itself (e.g. a Temporal workflow result,
        # see AdapterTransport.return_path): there is nowhere to send events to.
        return
    data = signing.encode_blob(sign_events(events, key_id))
    _destination(return_path).deliver(data, budget)


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
