"""One process-wide event loop in a background thread, where every shared resource lives.

Receivers, worker pools, backend clients and dispatchers are shared per process (DESIGN:
"a short-lived caller pays for them once"). Resources bound to an event loop cannot be
shared between loops, and wove starts a fresh loop per weave, so they all live on this one
loop. Sync callers block on it (``run_sync``); async callers on any other loop await it
(``run_async``); code already on it awaits directly. Nothing blocking ever runs on it.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None
_shutdown_hooks: list[Callable[[], Awaitable[None]]] = []


def _run(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def get_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use (and again in a forked child)."""
    global _loop, _thread, _pid
    if _loop is not None and _pid == os.getpid() and _loop.is_running():
        return _loop
    with _lock:
        if _loop is not None and _pid == os.getpid() and _loop.is_running():
            return _loop
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(
            target=_run, args=(loop, ready), name="wove-adapters-loop", daemon=True
        )
        thread.start()
        ready.wait()
        _loop, _thread, _pid = loop, thread, os.getpid()
        return loop


def on_loop() -> bool:
    """True when the caller is running on the shared loop."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def submit(coro: Coroutine[Any, Any, T]) -> ConcurrentFuture[T]:
    """Schedule ``coro`` on the shared loop from any thread."""
    return asyncio.run_coroutine_threadsafe(coro, get_loop())


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run ``coro`` on the shared loop and block this (non-loop) thread for its result."""
    if on_loop():
        coro.close()
        raise RuntimeError(
            "run_sync() was called on the wove-adapters loop itself; await the coroutine "
            "instead (a blocking wait here would deadlock)."
        )
    return submit(coro).result(timeout)


async def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on the shared loop from whatever loop the caller runs on."""
    if on_loop():
        return await coro
    return await asyncio.wrap_future(submit(coro))


def add_shutdown_hook(hook: Callable[[], Awaitable[None]]) -> None:
    """Run ``hook`` on the shared loop at interpreter exit (stop pools, close clients)."""
    _shutdown_hooks.append(hook)


def _shutdown() -> None:
    loop = _loop
    if loop is None or _pid != os.getpid() or not loop.is_running():
        return

    async def _run_hooks() -> None:
        for hook in reversed(_shutdown_hooks):
            try:
                await asyncio.wait_for(hook(), 10)
            except Exception:
                pass
        current = asyncio.current_task()
        leftovers = [task for task in asyncio.all_tasks() if task is not current]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    try:
        asyncio.run_coroutine_threadsafe(_run_hooks(), loop).result(30)
    except Exception:
        pass
    loop.call_soon_threadsafe(loop.stop)


atexit.register(_shutdown)
