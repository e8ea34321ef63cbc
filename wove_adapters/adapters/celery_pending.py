"""Runs that never start, on a Celery broker in Redis: ``PendingCheck`` (``celery.py``).

PENDING in the result backend means queued, unknown and lost alike: a worker killed with
SIGKILL keeps its prefetched messages unacked until the visibility timeout (an hour by
default), and a message lost with the broker reads PENDING forever. This module finds
where our messages are (queue lists, kombu's unacked hash, the workers that answer) and
tells the adapter which runs no worker will ever start (see docs/adapters/celery.md,
"Runs that never start"). It reads the broker from a thread of its own, never on the
event loop, and never imports celery at import time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from wove_adapters.worker.celery import TASK_NAME

if TYPE_CHECKING:
    from wove_adapters.adapters.celery import CeleryAdapter

# Gone runs are reported by the adapter's logger (the docs name it).
log = logging.getLogger("wove_adapters.adapters.celery")

T = TypeVar("T")

# How many consecutive inspections must miss a message before it is called gone: one
# can catch it between two places (popped from the queue, not yet in the unacked hash;
# acked, not yet STARTED); two, at least a reconcile interval apart, cannot.
_MISSES_FOR_GONE = 2
# Runs younger than this are not looked for: they are almost always still queued.
_MIN_AGE = 5.0
# Above this many queued messages the queue is not scanned (its runs stay PENDING).
_SCAN_LIMIT = 20_000
# Tracked submissions (released runs are forgotten; this bounds a caller that never
# releases).
_MAX_TRACKED = 200_000
# Delete a dead worker's unacked copy only if it is still exactly what we saw.
_DISCARD_SCRIPT = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
return 0
"""


@dataclasses.dataclass
class Snapshot:
    """Where the broker and the workers had our messages, read in pipeline order (queue
    lists, then the unacked hash, then the workers), so a message moving on while we
    read is seen at its next stop rather than missed."""

    seq: int
    started: float  # monotonic, before the first read
    asked: frozenset[str]
    queues: frozenset[str]  # scanned queue names; empty when over the scan limit
    queued: frozenset[str]
    unacked: dict[str, tuple[str, bytes]]  # task id -> (delivery tag, raw hash value)
    held: dict[str, str]  # task id -> the worker reporting it reserved/active/scheduled
    responders: frozenset[str]

    def missing(self, task_id: str, native: str, meta: dict[str, Any],
                queue: str | None) -> str | None:
        """Why no worker will start (or finish) this task, or None if it may."""
        if not self.responders:
            return None  # no worker answers: dead or busy, we cannot tell
        if task_id in self.held:
            return None
        answering = ", ".join(sorted(self.responders))
        if native == "STARTED":
            result = meta.get("result")
            host = result.get("hostname") if isinstance(result, dict) else None
            if host and host in self.responders:
                return (f"is STARTED at {host}, which answers but no longer holds it (the "
                        f"worker was restarted, or its process was killed)")
            return None
        if task_id in self.unacked:
            return (f"is held unacked in the broker by no worker that answers ({answering}): "
                    f"its worker died with the message prefetched, and Redis would "
                    f"redeliver it only after the visibility timeout")
        if queue is None or queue not in self.queues:
            return None  # its queue was not scanned: it may be there
        if task_id in self.queued:
            return None
        return (f"is in no queue, not held unacked and unknown to every worker that "
                f"answers ({answering}): the broker lost it (restarted without "
                f"persistence?) or a worker discarded it (one without the task "
                f"'{TASK_NAME}'?)")


class PendingCheck:
    """Tells a Celery run the backend will never start from one that is queued.

    PENDING in the result backend means queued, unknown and lost alike. On a Redis
    broker the message is findable: in its queue's lists (priority sub-queues
    included), in kombu's ``unacked`` hash while a worker holds it prefetched, or at a
    live worker (``inspect().query_task``: reserved, active, scheduled). A PENDING
    message in none of these, or held unacked while no answering worker has it, in two
    consecutive snapshots, is GONE; so is a STARTED task whose worker answers without
    it. Nothing is called gone while no worker answers at all (a busy worker looks the
    same as a dead one).

    The dispatcher asks ``status`` once per quiet run per reconcile round: ``verdict``
    only reads the latest snapshot, and a new one is taken in a thread of its own (one
    broadcast and a few Redis reads for all runs; the broadcast waits out its timeout,
    which must not hold a client thread that submissions need), never on the loop. On
    any other broker (RabbitMQ redelivers a dead consumer's unacked messages by itself)
    it never reports anything.
    """

    def __init__(self, adapter: CeleryAdapter, *, timeout: float, every: float) -> None:
        self.adapter = adapter
        self.timeout = timeout
        self.every = max(every, 0.1)
        self.redis: bool | None = None  # decided by the first snapshot
        self._sent: dict[str, tuple[float, str | None]] = {}  # task id -> (at, queue)
        self._asked: dict[str, float] = {}
        self._misses: dict[str, tuple[int, int]] = {}  # task id -> (snapshot seq, count)
        self._gone: dict[str, str] = {}
        self.snapshot: Snapshot | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._seq = 0
        self._connection: Any = None
        self._channel: Any = None
        self._client: Any = None
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"wove-celery-pending-{adapter.environment}"
        )

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # ------------------------------------------------------------ the loop side

    def sent(self, task_id: str, queue: str | None) -> None:
        self._sent[task_id] = (time.monotonic(), queue)
        if len(self._sent) > _MAX_TRACKED:
            self.forget(next(iter(self._sent)))

    def forget(self, task_id: str) -> None:
        for table in (self._sent, self._asked, self._misses, self._gone):
            table.pop(task_id, None)

    def verdict(self, task_id: str, native: str, meta: dict[str, Any]) -> str | None:
        """Why the task will never run (after enough misses), else None. Cheap: reads
        the latest snapshot, and starts the next one when it is due."""
        if self.redis is False:
            return None
        if task_id in self._gone:
            return self._gone[task_id]
        sent = self._sent.get(task_id)
        now = time.monotonic()
        if sent is None or now - sent[0] < _MIN_AGE:
            return None
        self._asked[task_id] = now
        self._maybe_refresh(now)
        snap = self.snapshot
        if snap is None or snap.started <= sent[0] or task_id not in snap.asked:
            return None
        reason = snap.missing(task_id, native, meta, sent[1])
        if reason is None:
            self._misses.pop(task_id, None)
            return None
        seq, count = self._misses.get(task_id, (-1, 0))
        if seq != snap.seq:
            count += 1
            self._misses[task_id] = (snap.seq, count)
        if count < _MISSES_FOR_GONE:
            return None
        self._gone[task_id] = reason
        return reason

    async def gone(self, task_id: str, reason: str) -> None:
        """Say so once, and drop a dead worker's unacked copy: the orphan policy now
        decides (requeue sends a new attempt), and the copy must not run an hour later
        when the visibility timeout would restore it."""
        if self._misses.pop(task_id, None) is None:
            return  # reported already
        log.warning("celery environment '%s': task %s %s; reporting it gone (the run's "
                    "delivery_orphan_policy applies)", self.adapter.environment, task_id,
                    reason)
        snap = self.snapshot
        entry = snap.unacked.get(task_id) if snap is not None else None
        if entry is not None:
            try:
                await self._call(self._discard, *entry)
            except Exception as exc:  # the copy stays; a redelivery is a stale attempt
                log.debug("could not drop the unacked copy of %s: %s", task_id, exc)

    def _maybe_refresh(self, now: float) -> None:
        if self._refresh is not None and not self._refresh.done():
            return
        if self.snapshot is not None and now - self.snapshot.started < self.every * 0.5:
            return
        horizon = now - 4 * self.every - 5.0  # ids nobody asked about lately: runs gone
        for task_id in [t for t, at in self._asked.items() if at < horizon]:
            self._asked.pop(task_id, None)
        asked = frozenset(self._asked)
        queues = frozenset(q for t in asked if (q := self._sent.get(t, (0.0, None))[1]))
        self._seq += 1
        self._refresh = asyncio.get_running_loop().create_task(
            self._take_snapshot(self._seq, asked, queues)
        )

    async def _take_snapshot(self, seq: int, asked: frozenset[str],
                             queues: frozenset[str]) -> None:
        try:
            snap = await self._call(self._read, seq, asked, queues)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker down: no verdicts until it answers again
            log.debug("celery pending check: snapshot failed: %s", exc)
            self.snapshot = None
            with contextlib.suppress(Exception):
                await self._call(self._disconnect)
            return
        if snap is not None:
            self.snapshot = snap

    async def aclose(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(BaseException):
                await self._refresh
        # Not awaited: a snapshot in progress may wait out its broadcast first, and
        # closing must not wait for it. The thread disconnects, then ends.
        with contextlib.suppress(RuntimeError):
            self._thread.submit(self._disconnect)
        self._thread.shutdown(wait=False)

    # ------------------------------------------------------------ the thread side

    def _open(self) -> Any:
        """The broker's kombu Redis channel (None for any other transport)."""
        if self._channel is None:
            connection = self.adapter.app.connection_for_read()
            if getattr(connection.transport, "driver_type", "") != "redis":
                connection.release()
                self.redis = False
                return None
            import redis

            self._connection = connection
            self._channel = connection.default_channel
            # kombu prefixes only the commands it uses; ours get the prefix by hand.
            self._client = redis.Redis(connection_pool=self._channel.pool)
            self.redis = True
        return self._channel

    def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._client = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.release()

    def _read(self, seq: int, asked: frozenset[str], queues: frozenset[str]) -> Snapshot | None:
        started = time.monotonic()
        channel = self._open()
        if channel is None:
            return None
        client = self._client
        prefix = str(getattr(channel, "global_keyprefix", "") or "")
        keys = sorted({prefix + channel._q_for_pri(queue, step)
                       for queue in queues for step in channel.priority_steps})
        queued: set[str] = set()
        scanned: frozenset[str] = frozenset()
        if keys:
            with client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.llen(key)
                sizes = pipe.execute()
            if sum(int(size) for size in sizes) <= _SCAN_LIMIT:
                with client.pipeline(transaction=True) as pipe:  # one atomic read
                    for key in keys:
                        pipe.lrange(key, 0, -1)
                    for items in pipe.execute():
                        queued.update(filter(None, map(_message_id, items)))
                scanned = queues
        unacked: dict[str, tuple[str, bytes]] = {}
        unacked_key = prefix + str(channel.unacked_key)
        if int(client.hlen(unacked_key)) > _SCAN_LIMIT:
            return None  # cannot tell held from lost: no verdicts
        for tag, raw in client.hgetall(unacked_key).items():
            task_id = _unacked_id(raw)
            if task_id:
                unacked[task_id] = (tag.decode() if isinstance(tag, bytes) else tag, raw)
        wanted = sorted(asked - queued)
        replies = self.adapter.control.inspect(timeout=self.timeout).query_task(*wanted)
        held: dict[str, str] = {}
        for worker, found in (replies or {}).items():
            if not isinstance(found, dict) or "error" in found:
                return None  # a worker that cannot say what it holds: no verdicts
            for task_id in found:
                held[str(task_id)] = str(worker)
        return Snapshot(
            seq=seq, started=started, asked=asked, queues=scanned,
            queued=frozenset(queued), unacked=unacked, held=held,
            responders=frozenset(str(worker) for worker in (replies or {})),
        )

    def _discard(self, tag: str, raw: bytes) -> None:
        channel = self._open()
        if channel is None:
            return
        prefix = str(getattr(channel, "global_keyprefix", "") or "")
        self._client.eval(_DISCARD_SCRIPT, 2, prefix + str(channel.unacked_key),
                          prefix + str(channel.unacked_index_key), tag, raw)


def _message_id(raw: bytes) -> str | None:
    """The task id of a kombu message as the Redis transport stores it (JSON with the
    Celery headers), or None for anything else."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        return str(json.loads(raw)["headers"]["id"])
    return None


def _unacked_id(raw: bytes) -> str | None:
    """The task id of an entry of kombu's unacked hash: ``[message, exchange, key]``."""
    with contextlib.suppress(ValueError, TypeError, AttributeError, IndexError, KeyError):
        return str(json.loads(raw)[0]["headers"]["id"])
    return None
