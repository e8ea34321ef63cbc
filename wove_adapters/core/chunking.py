"""Gathering the runs of one chunk of a mapped call before they go to the backend together.

``Hub.map`` names each first attempt's chunk (``RunAttempt.extra["chunk"]``: the call, the
chunk's number, how many runs it holds). Each run still passes every gate of its own on
the dispatcher's launch path (its claim, its ``delivery_max_in_flight`` slot); the runs
of a chunk meet here and leave in one ``Transport.submit_chunk`` once all of them have
arrived, or ``WINDOW`` seconds after the first did (a run held back by a gate does not
hold back its neighbours: it goes with a later, smaller chunk or alone). A run that ended
while it waited (cancelled, timed out) is left out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wove_adapters.core.transport import RunAttempt, Transport

# How long the first run of a chunk waits for the rest at most.
WINDOW = 0.05


@dataclass
class _Gathering:
    expected: int
    members: list[tuple[RunAttempt, asyncio.Future[bool], Callable[[], bool]]] = field(
        default_factory=list
    )
    timer: asyncio.TimerHandle | None = None


class ChunkGatherer:
    """One per dispatcher; see the module docstring."""

    def __init__(self, transport: Transport, spawn: Callable[[Any], Any]) -> None:
        self._transport = transport
        self._spawn = spawn
        self._open: dict[tuple[str, int], _Gathering] = {}

    async def submit(
        self, attempt: RunAttempt, chunk: tuple[str, int, int], alive: Callable[[], bool]
    ) -> bool:
        """Wait until this run's chunk leaves; True when the run went with it (False:
        it ended while it waited). Raises what the submission raised."""
        return await self.enqueue(attempt, chunk, alive)

    def enqueue(
        self, attempt: RunAttempt, chunk: tuple[str, int, int], alive: Callable[[], bool]
    ) -> asyncio.Future[bool]:
        """``submit`` without a coroutine: the future it would wait for (a run that
        waits for nothing else needs no task of its own to be launched)."""
        call, number, expected = chunk
        key = (call, number)
        loop = asyncio.get_running_loop()
        gathering = self._open.get(key)
        if gathering is None:
            gathering = self._open[key] = _Gathering(expected)
            gathering.timer = loop.call_later(WINDOW, self._leave, key)
        sent: asyncio.Future[bool] = loop.create_future()
        gathering.members.append((attempt, sent, alive))
        if len(gathering.members) >= gathering.expected:
            self._leave(key)
        return sent

    def _leave(self, key: tuple[str, int]) -> None:
        gathering = self._open.pop(key, None)
        if gathering is None:
            return
        if gathering.timer is not None:
            gathering.timer.cancel()
        self._spawn(self._send(gathering))

    async def _send(self, gathering: _Gathering) -> None:
        going: list[tuple[RunAttempt, asyncio.Future[bool]]] = []
        for attempt, sent, alive in gathering.members:
            if alive() and not sent.done():
                going.append((attempt, sent))
            elif not sent.done():
                sent.set_result(False)
        if not going:
            return
        try:
            await self._transport.submit_chunk([attempt for attempt, _ in going])
        except BaseException as exc:
            for _, sent in going:
                if not sent.done():
                    sent.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _, sent in going:
            if not sent.done():
                sent.set_result(True)

    def close(self) -> None:
        """The dispatcher stops: runs still gathering never reach the backend (their
        orphan policy then sees runs that were not launched)."""
        for gathering in self._open.values():
            if gathering.timer is not None:
                gathering.timer.cancel()
            for _, sent, _ in gathering.members:
                if not sent.done():
                    sent.set_result(False)
        self._open.clear()


# ``map_chunk_size: "auto"``: a chunk holds about this many seconds of task time, so a
# worker spends little of its time on per-message overhead while results still stream;
CHUNK_SECONDS = 0.1
# runs per chunk while a task's time is not known yet (its first mapped call);
UNMEASURED = 32
# at most this many runs per chunk;
MAX_CHUNK = 128
# and a call is spread over at least this many chunks (several workers share it).
SPREAD = 8


def note_task_seconds(table: dict[str, float], task: str, seconds: float) -> None:
    """Fold one run's time on its worker into ``table``'s moving average for ``task``
    (what ``"auto"`` sizes the task's chunks from); the table keeps 4096 tasks."""
    before = table.get(task)
    table[task] = seconds if before is None else before + (seconds - before) * 0.1
    if len(table) > 4096:
        table.pop(next(iter(table)))


def chunkable(policy: Any, transport: Transport, *, keyed: bool) -> bool:
    """Whether a run under ``policy`` may travel in a chunk on ``transport``: not a keyed
    run or one under task controls (each is claimed alone), not ``detach`` (each outlives
    its call alone), and only where the transport carries chunks."""
    return (
        transport.supports_chunks
        and not keyed
        and not policy.controls.active
        and policy.orphan_policy != "detach"
    )


def chunks_wanted(setting: Any) -> bool:
    """Whether ``map_chunk_size`` allows chunks at all (raises on a bad value)."""
    return chunk_size(setting, MAX_CHUNK * SPREAD, None, None) > 1


def chunk_size(setting: Any, runs: int, task_seconds: float | None, cap: int | None) -> int:
    """How many runs of a mapped call of ``runs`` go in one backend message: the
    ``map_chunk_size`` setting (a number, or ``"auto"``: from the task's measured time on
    the worker, ``task_seconds``), within the call's ``delivery_max_in_flight`` (``cap``:
    a chunk leaves once its runs are all in flight). 1: no chunking."""
    if setting is False or setting is None or setting in ("off", "none") or (
        type(setting) is int and setting in (0, 1)
    ):
        return 1
    if setting == "auto":
        if task_seconds is None:
            size = UNMEASURED
        else:
            size = int(CHUNK_SECONDS / max(task_seconds, 1e-4))
        size = min(size, MAX_CHUNK, -(-runs // SPREAD))
    elif isinstance(setting, int) and not isinstance(setting, bool) and setting > 0:
        size = setting
    else:
        raise ValueError(
            f"map_chunk_size must be a positive whole number, \"auto\" or 0 (off), not "
            f"{setting!r}"
        )
    if cap:
        size = min(size, cap)
    return max(1, min(size, runs))
