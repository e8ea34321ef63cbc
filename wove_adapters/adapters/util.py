"""Caller-side helpers the backend adapters share; none of them talks to a backend.

Watching a backend's future as the run's way back (Dask, Ray): the run it stands for,
the ``task_error`` an exception in it becomes (a refused payload's is the transport's
PayloadError naming the key), and the bounded memory of how finished runs ended.
Coalescing the calls made in one loop iteration into one request. The worker command
line, grouping a batch of jobs into array jobs, payload-store chores, ``doctor`` rows and
configuration values that name a secret. Nothing here imports a backend library.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from wove_adapters.core import frames
from wove_adapters.core import stores as payload_mod
from wove_adapters.core.codec import attach_remote_traceback
from wove_adapters.core.errors import PayloadError, redact_url

Row = tuple[str, bool, str]  # a doctor row: what, ok, detail (what to do when not ok)
T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")

# ---------------------------------------------------------------- a future as the way back


@dataclass
class Watched:
    """A run whose backend future is watched: the future's end becomes its terminal
    event, so no run waits for a reconciliation tick."""

    run_id: str
    task_id: str
    attempt: int


def failure_frame(
    run: Watched, exc: BaseException, *, native: bool, remote_tb: str = ""
) -> dict[str, Any]:
    """The ``task_error`` for an exception the future carries: a payload body that could
    not be read, the task raised (``native`` return path) or our worker function failed.
    ``remote_tb`` (the task's own frames, as the worker saw them) is chained to the
    caller's exception as ``concurrent.futures`` does it."""
    source = "payload" if isinstance(exc, PayloadError) else ("task" if native else "worker")
    frame = frames.error_event(run.run_id, run.task_id, exc, attempt=run.attempt, source=source)
    if remote_tb:
        frame["error"]["traceback"] = remote_tb
        attach_remote_traceback(exc, remote_tb)
    return frame


def refusal_frame(executor: str, run: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The run's error when its worker refused the payload (``RunState.REFUSED``), for an
    adapter that emits its runs' events itself (a future or a workflow result as the way
    back): the transport's PayloadError naming the signing key (``executor_config``'s
    ``_key_id``) and the fix. ``run`` has ``run_id``, ``task_id`` and ``attempt``."""
    from wove_adapters.adapters.transport import refused_event

    return refused_event(executor, run, str(config.get("_key_id", "?")))


def run_event(run: Any, kind: str, **fields: Any) -> dict[str, Any]:
    """An event frame of ``kind`` for ``run`` (anything with ``run_id``, ``task_id`` and
    ``attempt``: a watched run, a ``JobSpec``), for an adapter that reports its runs'
    ends itself."""
    return frames.event(kind, run.run_id, run.task_id, run.attempt, **fields)


class FinishedStates(Generic[V]):
    """How the last ``size`` released runs ended, for ``status`` after the backend's
    handle is gone (oldest forgotten first)."""

    def __init__(self, size: int = 10_000) -> None:
        self._states: OrderedDict[str, V] = OrderedDict()
        self._size = size

    def remember(self, handle: str, state: V) -> None:
        self._states[handle] = state
        while len(self._states) > self._size:
            self._states.popitem(last=False)

    def forget(self, handle: str) -> None:
        self._states.pop(handle, None)

    def get(self, handle: str, default: V) -> V:
        return self._states.get(handle, default)


# ---------------------------------------------------------------- one request per loop iteration


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


# ---------------------------------------------------------------- jobs that run the worker


def worker_command(python: str, *args: str) -> list[str]:
    """The command a batch job's container or script runs: one payload, then exit."""
    return [python, "-m", "wove_adapters.worker", *args]


def delete_payloads(store: payload_mod.PayloadStore, keys: Sequence[str]) -> None:
    """Blocking: delete stored payloads by key, quietly. One already gone, or a store that
    fails now, leaves an object for the store's own expiry, not an error for the run."""
    for key in keys:
        with contextlib.suppress(Exception):
            store.delete(payload_mod.BodyRef(store=store.url, key=key, sha256="", size=0))


def resolve_secret(value: str, *, option: str) -> str:
    """A configuration value that may name where the secret is: ``env:VAR``,
    ``file:/path`` or the literal value. ``option`` names it in the error."""
    if value.startswith("env:"):
        name = value[4:]
        found = os.environ.get(name)
        if not found:
            raise ValueError(f"executor_config.{option} is 'env:{name}': ${name} is unset")
        return found
    if value.startswith("file:"):
        with open(value[5:]) as handle:
            return handle.read().strip()
    return value


async def checked_row(
    label: str,
    check: Awaitable[T],
    ok: str | Callable[[T], str],
    failed: Callable[[Exception], str],
    *,
    errors: type[Exception] | tuple[type[Exception], ...] = Exception,
) -> Row:
    """One ``doctor`` row from one check: a failure is a row that says what to do."""
    try:
        value = await check
    except errors as exc:
        return (label, False, failed(exc))
    return (label, True, ok if isinstance(ok, str) else ok(value))


async def store_row(url: str | None, readers: str) -> Row:
    """The ``doctor`` row of the payload store at ``url`` (None: the default store):
    write, read back and delete one small body, off the loop. ``readers`` (who reads the
    payloads there) goes in the detail; the URL is shown without its password."""
    url = url or payload_mod.default_store_url()
    where = redact_url(url)
    s3 = " (S3 bucket)" if url.startswith("s3:") else ""

    def probe() -> None:
        store = payload_mod.open_store(url)
        ref = store.put(f"doctor-{uuid.uuid4().hex}", b"wove-adapters doctor")
        store.get(ref)
        store.delete(ref)

    return await checked_row(
        f"payload store reachable{s3}", asyncio.to_thread(probe),
        f"{where} (write, read, delete; {readers})",
        lambda exc: f"{where}: {exc}; the caller writes payloads here and {readers}")


def write_private(path: Path, text: str) -> None:
    """Blocking: write a payload file only its owner can read (it carries a signed task)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
