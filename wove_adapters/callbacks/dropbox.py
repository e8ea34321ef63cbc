"""The ``redis`` return path: a drop box for workers that cannot reach the caller.

The worker RPUSHes signed event batches to a Redis list; the caller BLPOPs them and puts
them through the very checks the HTTP receiver applies (signature with the keys held in
memory, window, nonce, the run's key binding) before routing them to their runs. One list
and one reader per (Redis URL, process, config).

Anyone who can write to that Redis can push entries: one larger than ``max_body`` is
dropped unread (counted, logged), and large ones are verified in a thread, so the reader
never holds the caller's loop. A worker cannot learn that its entry was refused, so the
limit (``DEFAULT_MAX_ENTRY``) is wider than the HTTP receiver's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import msgspec

from wove_adapters.callbacks.receiver import VERIFY_IN_THREAD, CallbackReceiver, refusal
from wove_adapters.core import observe
from wove_adapters.core.errors import DeliveryOrphanedError, MissingBackendError, PayloadError

log = logging.getLogger("wove_adapters.dropbox")
# Redis refuses bulk strings above 512 MB; an event batch has no business near that.
DEFAULT_MAX_ENTRY = 64 * 1024 * 1024
# How long closing waits for the reader to stop, and for Redis to delete the list.
CLOSE_SECONDS = 3.0
# While its Redis is down, the reader logs its failure once every this many tries
# (two a second): a minute's outage logs two or three lines, not 120.
FAILING_LOG_EVERY = 120


class DropboxReader(CallbackReceiver):
    """Routes events like the receiver, but reads them from a Redis list."""

    def __init__(
        self, url: str, key: str | None = None, *, max_entry: int = DEFAULT_MAX_ENTRY
    ) -> None:
        super().__init__(max_body=max_entry)
        self.redis_url = url
        self.key = key or f"wove-adapters:dropbox:{uuid.uuid4().hex}"
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._client: Any = None
        # Entries popped and not yet routed (a large one is verified in a thread): the
        # backlog, for the transport, until they are.
        self._taking = 0

    @property
    def url(self) -> str:
        return self.redis_url

    async def start(self, *, environment: str | None = None) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise MissingBackendError("redis return path", "redis", "redis") from None
        self._client = aioredis.Redis.from_url(self.redis_url)
        await self._client.ping()
        self._task = asyncio.get_running_loop().create_task(self._read())
        self.ready.set()

    async def _read(self) -> None:
        # Not ``while True``: a cancel that lands inside the Redis client's reconnect can
        # come out as its ConnectionError (the cancellation swallowed), and a reader
        # that only stops on CancelledError then never stops: aclose, and with it the
        # caller's exit, waited for good while the drop box's Redis was down.
        failing = 0  # reads failed in a row (Redis down): logged once, then every minute
        while not self._closing:
            try:
                item = await self._client.blpop([self.key], timeout=1)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                if failing % FAILING_LOG_EVERY == 0:
                    log.warning("drop box %s read failed (%d in a row; retried every 0.5 s):"
                                " %s", self.key, failing + 1, exc)
                failing += 1
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.warning("drop box %s reads again after %d failed reads", self.key, failing)
                failing = 0
            if item is None:
                continue
            self._taking += 1
            try:
                await self.take(bytes(item[1]))
            finally:
                self._taking -= 1

    async def take(self, data: bytes) -> bool:
        """Check one entry as the receiver checks a request, and route it: True if it
        was accepted."""
        if len(data) > self.max_body:
            self.stats["too_large"] += 1
            self.stats["rejected"] += 1
            if observe.observers:
                observe.receiver_rejected("too_large")
            log.warning("drop box %s: dropped an entry of %d bytes (limit %d), unread",
                        self.key, len(data), self.max_body)
            return False
        try:
            if len(data) > VERIFY_IN_THREAD:
                key_id, batch = await asyncio.to_thread(self.open_batch, data)
            else:
                key_id, batch = self.open_batch(data)
        except (PayloadError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats["rejected"] += 1
            if observe.observers:
                observe.receiver_rejected(
                    refusal(exc)[1] if isinstance(exc, PayloadError) else "malformed"
                )
            log.warning("drop box %s: rejected an entry: %s", self.key, exc)
            return False
        wrong = self.unbound(batch.events, key_id)
        if wrong:
            self.stats["wrong_key"] += 1
            self.stats["rejected"] += 1
            if observe.observers:
                observe.receiver_rejected("wrong_key")
            log.warning("drop box %s: rejected an entry signed with key %s for run %s, "
                        "which was signed with another key", self.key, key_id, wrong[0])
            return False
        self.stats["accepted"] += 1
        self.route(batch.events, data)
        return True

    async def ping(self) -> None:
        """Raise when the drop box's Redis does not answer (``doctor``)."""
        await self._client.ping()

    async def backlog(self) -> bool:
        """True while events wait in the list. With this return path a job ends once
        its events are pushed: until we have read them all, a finished job whose
        terminal event has not come is not lost. A failed check says False (it must
        not hide a lost run for good)."""
        if self._taking:
            return True
        try:
            return bool(await self._client.llen(self.key))
        except Exception:
            return False

    def lost_outcome(self, run_id: str, job: str | None = None) -> DeliveryOrphanedError:
        """The error for a run whose job succeeded while no terminal event of it ever
        reached this reader and the list is empty: its worker pushed the outcome, and
        another reader of the list took it (anyone who can write to that Redis can)."""
        return DeliveryOrphanedError(
            f"run {run_id}{f' (job {job})' if job else ''} succeeded, but its outcome was "
            f"lost on the return path: its worker pushed it to the drop box {self.key} at "
            f"{self.redis_url}, and this caller never read it (the list is empty; read "
            f"here: {self.stats['accepted']} accepted, {self.stats['rejected']} refused). "
            f"Another client popped it: anyone who can write to that Redis can. Protect it "
            f"(AUTH, an ACL user per caller), or use return_path 'http'.",
            run_id=run_id,
        )

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # The reader sees _closing within one blpop timeout or back-off, whatever
            # became of the cancel; bounded anyway.
            await asyncio.wait({self._task}, timeout=CLOSE_SECONDS)
        if self._client is not None:
            with contextlib.suppress(Exception):
                # The list is ours alone; a Redis that does not answer keeps it.
                await asyncio.wait_for(self._client.delete(self.key), CLOSE_SECONDS)
            with contextlib.suppress(Exception):
                await self._client.aclose()


_readers: dict[str, DropboxReader] = {}


async def get_dropbox(url: str) -> DropboxReader:
    reader = _readers.get(url)
    if reader is None:
        reader = DropboxReader(url)
        await reader.start()
        _readers[url] = reader
        from wove_adapters.core.loop import add_shutdown_hook

        add_shutdown_hook(reader.aclose)
    return reader
