"""Liveness leases in Redis: a worker renews one while it really runs a job; the caller
reads a lapsed lease as the worker gone.

Some backends keep a started job "running" after its worker died: ARQ marks a job in
progress for ``job_timeout + 10`` seconds and does not record which worker runs it;
Taskiq has no job states at all. So the worker that runs a job holds a lease key for it,
renewed every third of ``seconds``, and the caller's ``status`` reads the key's ``PTTL``.

A lease is written to live ``seconds + TAIL``: a lapsed lease stays readable for
``TAIL`` seconds, so its age can be told on Redis's own clock (no skew between hosts),
and a lease not renewed for ``seconds`` is lapsed the moment it is, whatever ``seconds``
the worker was given: alive exactly while ``PTTL >= TAIL``. A key that is missing
altogether is either not written yet (a job's first moments, for a worker that writes
its first lease late) or long lapsed; ``LeaseReader``'s grace tells the two apart.

Both sides work on an asyncio Redis client (``redis.asyncio``) the backend's code owns;
nothing here imports a backend library.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

# Seconds a lapsed lease stays readable (see the module docstring).
TAIL = 60.0
TAIL_MS = int(TAIL * 1000)


def lease_ms(seconds: float) -> int:
    """What a lease held for ``seconds`` is written to live, in milliseconds."""
    return int((seconds + TAIL) * 1000)


def alive(pttl: int) -> bool:
    """Whether a lease key's ``PTTL`` says its worker renewed it within its ``seconds``
    (a key without an expiry is not ours to judge: alive)."""
    return pttl >= TAIL_MS or pttl == -1


# ==================================================================== the worker's side


@dataclass
class _Held:
    seconds: float
    due: float  # loop time of the next write


class LeaseKeeper:
    """Renews every lease held through one Redis client in one pipeline, each a third of
    its ``seconds`` after the last write, from one task (``keeper(client)`` finds it)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._held: dict[str, _Held] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def hold(self, key: str, seconds: float, *, first_after: float | None = None) -> None:
        """Hold ``key`` until ``release``: first written ``first_after`` seconds from now
        (default: a third of ``seconds``, for a lease the job's start wrote already; a
        short job whose first write is late never costs a Redis command for it)."""
        loop = asyncio.get_running_loop()
        delay = seconds / 3 if first_after is None else first_after
        self._held[key] = _Held(seconds, loop.time() + delay)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._renew())

    def release(self, key: str) -> None:
        """Stop renewing ``key`` (it lapses; the job's end usually says more first)."""
        self._held.pop(key, None)

    async def aclose(self) -> None:
        self._held.clear()
        _keepers.pop(id(self.client), None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    async def _renew(self) -> None:
        loop = asyncio.get_running_loop()
        while self._held:
            now = loop.time()
            due = {key: held for key, held in self._held.items() if held.due <= now}
            if due:
                # Redis away: the next round tries again; a lease that lapses meanwhile
                # is the caller's to judge.
                with contextlib.suppress(Exception):
                    async with self.client.pipeline(transaction=False) as pipe:
                        for key, held in due.items():
                            pipe.set(key, self.owner, px=lease_ms(held.seconds))
                        await pipe.execute()
                for held in due.values():
                    held.due = now + held.seconds / 3
            self._wake.clear()
            if self._held:
                wait = min(held.due for held in self._held.values()) - loop.time()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(wait, 0.0))


_keepers: dict[int, LeaseKeeper] = {}
T = TypeVar("T")


def one_per_client(made: dict[int, T], client: Any, make: Callable[[Any], T]) -> T:
    """The one ``make(client)`` of ``client`` in this process: a worker's Redis client
    gets one batcher of each kind, however many jobs share it (kept by the client's id,
    checked against a new client that reuses the id)."""
    found = made.get(id(client))
    if found is None or getattr(found, "client", None) is not client:
        found = made[id(client)] = make(client)
    return found


def keeper(client: Any) -> LeaseKeeper:
    """The one ``LeaseKeeper`` of ``client`` in this process."""
    return one_per_client(_keepers, client, LeaseKeeper)


# ==================================================================== the caller's side


class LeaseReader:
    """Tells, from a lease's ``PTTL``, whether the worker running a job is still there.

    ``unleased_grace``: how long a job the backend says is running may have no lease key
    at all before that means its worker is gone (the worker writes its first lease a
    little into the job); 0 when the job's start writes the lease (no key: gone)."""

    def __init__(self, unleased_grace: float = 0.0) -> None:
        self.unleased_grace = unleased_grace
        self._unleased: dict[str, float] = {}  # handle -> when first seen without a lease

    def alive(self, handle: str, pttl: int) -> bool:
        if pttl != -2:  # the key exists
            self._unleased.pop(handle, None)
            return alive(pttl)
        if self.unleased_grace <= 0:
            return False
        first = self._unleased.setdefault(handle, time.monotonic())
        return time.monotonic() - first <= self.unleased_grace

    def forget(self, handle: str) -> None:
        """The job is no longer running (or no longer ours to ask about)."""
        self._unleased.pop(handle, None)
