"""The worker's way back: ordered, batched, signed event delivery with retry and backoff.

One sender per destination per process, living on the shared background loop: a worker
that runs many tasks (a Celery or RQ worker) keeps one persistent HTTP connection to the
caller's receiver, and a task's code never waits on the network except for its terminal
event, which is acknowledged before ``run()`` returns so a worker that exits right after
cannot lose it. A briefly unreachable receiver is retried with capped exponential backoff
for ``WOVE_ADAPTERS_RETRY_SECONDS`` (default 120 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import Future as ConcurrentFuture
from typing import Any

import msgspec

from wove_adapters.callbacks import signing
from wove_adapters.callbacks.payload import ReturnPath
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.frames import EventBatch, WireEvent

_encoder = msgspec.msgpack.Encoder()
RETRY_SECONDS = float(os.environ.get("WOVE_ADAPTERS_RETRY_SECONDS", "120"))
_PERMANENT = {400, 401, 403, 404, 405, 413, 415, 422}


class DeliveryFailed(Exception):
    """The destination refused the events or stayed unreachable past the retry budget."""


def sign_events(events: list[WireEvent], key_id: str) -> signing.SignedBlob:
    return signing.sign(_encoder.encode(EventBatch(events=events, sent_at=time.time())), key_id)


class _Destination:
    def __init__(self, return_path: ReturnPath, key_id: str) -> None:
        self.return_path = return_path
        self.key_id = key_id
        self.queue: asyncio.Queue[tuple[WireEvent, asyncio.Future[None]]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.session: Any = None
        self.redis: Any = None

    def ensure_running(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while True:
            first = await self.queue.get()
            batch = [first]
            while not self.queue.empty() and len(batch) < 256:
                batch.append(self.queue.get_nowait())
            blob = sign_events([item[0] for item in batch], self.key_id)
            try:
                await self._deliver(signing.encode_blob(blob))
            except Exception as exc:
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_exception(DeliveryFailed(str(exc)))
            else:
                for _, waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)

    async def _deliver(self, data: bytes) -> None:
        deadline = time.monotonic() + RETRY_SECONDS
        delay = 0.05
        while True:
            try:
                if self.return_path.kind == "redis":
                    await self._push_redis(data)
                else:
                    await self._post_http(data)
                return
            except PayloadError:
                raise
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    raise DeliveryFailed(
                        f"could not deliver events to {self.return_path.url} within "
                        f"{RETRY_SECONDS:.0f}s: {exc}"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _post_http(self, data: bytes) -> None:
        import aiohttp

        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(limit=8, keepalive_timeout=60),
            )
        async with self.session.post(
            self.return_path.url,
            data=data,
            headers={"Content-Type": "application/x-wove-events"},
        ) as response:
            if response.status < 300:
                return
            text = (await response.text())[:200]
            if response.status in _PERMANENT:
                raise PayloadError(f"receiver refused events: HTTP {response.status} {text}")
            raise ConnectionError(f"receiver answered HTTP {response.status} {text}")

    async def _push_redis(self, data: bytes) -> None:
        if self.redis is None:
            import redis.asyncio as aioredis

            self.redis = aioredis.Redis.from_url(self.return_path.url)
        await self.redis.rpush(self.return_path.key, data)


_destinations: dict[tuple[str, str, str, str], _Destination] = {}


async def _close_all() -> None:
    for destination in list(_destinations.values()):
        if destination.task is not None:
            destination.task.cancel()
        if destination.session is not None:
            await destination.session.close()
        if destination.redis is not None:
            await destination.redis.aclose()
    _destinations.clear()


shared_loop.add_shutdown_hook(_close_all)


async def _enqueue(return_path: ReturnPath, key_id: str, event: WireEvent) -> asyncio.Future[None]:
    ident = (return_path.kind, return_path.url, return_path.key, key_id)
    destination = _destinations.get(ident)
    if destination is None:
        destination = _destinations[ident] = _Destination(return_path, key_id)
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    destination.queue.put_nowait((event, waiter))
    destination.ensure_running()
    return waiter


def send(return_path: ReturnPath, key_id: str, event: WireEvent) -> ConcurrentFuture[None]:
    """Queue one event; the future resolves when its batch is acknowledged. Thread-safe."""
    if return_path.kind == "native":
        # The backend carries the outcome back itself (Temporal's workflow result, ...):
        # nothing to send, and nothing for the task to wait on.
        done: ConcurrentFuture[None] = ConcurrentFuture()
        done.set_result(None)
        return done

    async def _go() -> None:
        waiter = await _enqueue(return_path, key_id, event)
        await waiter

    return shared_loop.submit(_go())


async def asend(return_path: ReturnPath, key_id: str, event: WireEvent) -> None:
    await shared_loop.run_async(_await_enqueued(return_path, key_id, event))


async def _await_enqueued(return_path: ReturnPath, key_id: str, event: WireEvent) -> None:
    waiter = await _enqueue(return_path, key_id, event)
    await waiter
