"""asyncio helpers that talk to no backend: the calls made in one loop iteration become
one request (or one thread hop, or one array job), a call the caller gave up on is undone,
and a bounded wait cancels what is left. The backend adapters use them to batch their own
clients' calls; nothing here imports a backend library.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class IterationBatch(Generic[T]):
    """Items added during one event-loop iteration reach ``flush`` together, right after
    it: many calls made at once become one request to the backend."""

    def __init__(self, flush: Callable[[list[T]], None]) -> None:
        self._items: list[T] = []
        self._flush = flush

    def add(self, item: T) -> None:
        self._items.append(item)
        if len(self._items) == 1:
            asyncio.get_running_loop().call_soon(self._run)

    def _run(self) -> None:
        items, self._items = self._items, []
        self._flush(items)


class ThreadHops:
    """Blocking client calls (a broker's sync library) made during one loop iteration go
    to the client threads together: a mapped call's thousand submits cost a hop per
    thread, not a thousand hops, each with its wake-ups on both sides. Each call still
    gets its own result or error; calls run in the order they were made, split evenly
    over ``threads`` threads of ``pool`` (the broker round trips overlap)."""

    def __init__(self, pool: concurrent.futures.Executor | None, threads: int) -> None:
        self._pool = pool  # None: asyncio's default executor
        self._threads = max(1, threads)
        self._batch: IterationBatch[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            IterationBatch(self._send)
        )

    def call(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> asyncio.Future[R]:
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._batch.add((functools.partial(fn, *args, **kwargs), waiter))
        return waiter

    def _send(self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]]) -> None:
        loop = asyncio.get_running_loop()
        size = -(-len(batch) // self._threads)
        for start in range(0, len(batch), size):
            part = batch[start:start + size]
            done = loop.run_in_executor(self._pool, _run_calls, [call for call, _ in part])
            done.add_done_callback(functools.partial(_settle_calls, part))


def _run_calls(calls: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    answers: list[tuple[bool, Any]] = []
    for call in calls:
        try:
            answers.append((True, call()))
        except BaseException as exc:  # each call's own error, to its own waiter
            answers.append((False, exc))
    return answers


def _settle_calls(
    part: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
    done: asyncio.Future[list[tuple[bool, Any]]],
) -> None:
    if done.cancelled() or done.exception() is not None:
        error = asyncio.CancelledError() if done.cancelled() else done.exception()
        for _, waiter in part:
            if not waiter.done():
                waiter.set_exception(error)  # type: ignore[arg-type]
        return
    for (_, waiter), (ok, value) in zip(part, done.result(), strict=True):
        if waiter.done():
            continue
        if ok:
            waiter.set_result(value)
        else:
            waiter.set_exception(value)


def group_by(items: Iterable[T], signature: Callable[[T], Hashable]) -> list[list[T]]:
    """``items`` in groups of equal ``signature`` (one request, or one array job, each);
    groups and their items keep the order they came in."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(signature(item), []).append(item)
    return list(groups.values())


async def submit_grouped(
    jobs: list[T], signature: Callable[[T], Hashable],
    submit: Callable[[list[T]], Awaitable[list[str]]],
) -> list[str]:
    """``submit_many`` for an array-job backend: ``submit`` gets each group of jobs with
    equal ``signature`` (one array job each: its children share one set of options) and
    returns their handles; the handles come back in the jobs' order."""
    handles = [""] * len(jobs)
    for positions in group_by(range(len(jobs)), lambda position: signature(jobs[position])):
        group_handles = await submit([jobs[position] for position in positions])
        for position, handle in zip(positions, group_handles, strict=True):
            handles[position] = handle
    return handles


class BatchedFetch(Generic[T, R]):
    """Results asked for in the same loop iteration are fetched with one request (the
    backend pays per request, not per result); if that request fails, each is fetched on
    its own, so each hears its own error. Owns its background tasks: ``aclose`` ends them."""

    def __init__(
        self,
        many: Callable[[list[T]], Awaitable[Sequence[R]]],
        one: Callable[[T], Awaitable[R]],
    ) -> None:
        self._many = many
        self._one = one
        self._batch: IterationBatch[tuple[T, asyncio.Future[R]]] = IterationBatch(self._spawn)
        self._tasks: set[asyncio.Task[None]] = set()

    def fetch(self, item: T) -> asyncio.Future[R]:
        waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._batch.add((item, waiter))
        return waiter

    def _spawn(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        task = asyncio.get_running_loop().create_task(self._fetch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            values = await self._many([item for item, _ in batch])
        except Exception:  # one lost result: fetch one by one
            for item, waiter in batch:
                try:
                    value = await self._one(item)
                except Exception as exc:
                    if not waiter.done():
                        waiter.set_exception(exc)
                else:
                    if not waiter.done():
                        waiter.set_result(value)
            return
        for (_, waiter), value in zip(batch, values, strict=True):
            if not waiter.done():
                waiter.set_result(value)

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def undone_if_abandoned(
    call: Awaitable[T], undo: Callable[[T], Awaitable[object]]
) -> T:
    """Await ``call`` shielded from our caller's cancellation. If the caller gives up
    while the call is in flight, the call still completes, and what it made (a job that
    would run for nobody) is undone: ``undo`` gets its result, errors ignored."""
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _undo_soon(done, undo))
        raise


_UNDOING: set[asyncio.Task[None]] = set()  # strong references until each undo ends


def _undo_soon(done: asyncio.Future[T], undo: Callable[[T], Awaitable[object]]) -> None:
    if done.cancelled() or done.exception() is not None:
        return

    async def quietly() -> None:
        with contextlib.suppress(Exception):
            await undo(done.result())

    task = asyncio.get_running_loop().create_task(quietly())
    _UNDOING.add(task)
    task.add_done_callback(_UNDOING.discard)


async def retrying(
    call: Callable[[], Awaitable[T]], *, errors: tuple[type[BaseException], ...],
    budget: float, delay: float, cap: float,
) -> T:
    """``await call()``, tried again on ``errors`` with capped exponential backoff while
    ``budget`` seconds allow another wait; the last error is raised. A service that is
    only restarting is waited for, a dead one still fails."""
    deadline = time.monotonic() + budget
    while True:
        try:
            return await call()
        except errors:
            if time.monotonic() + delay > deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, cap)


async def wait_within(waits: Sequence[Awaitable[Any]], timeout: float) -> int:
    """Wait for all of ``waits``, at most ``timeout`` seconds; the ones still going then
    are cancelled. Returns how many that was."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    if not tasks:
        return 0
    _, left = await asyncio.wait(tasks, timeout=timeout)
    for task in left:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return len(left)
