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
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future as ConcurrentFuture
from typing import Any, Final, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_pid: int | None = None
_shutdown_hooks: list[tuple[int, Callable[[], Awaitable[None]]]] = []
_exit_closers: list[Callable[[], None]] = []
_stopped = False
log = logging.getLogger("wove_adapters.loop")


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
        if _pid is not None and _pid != os.getpid():
            # A forked child: the parent's hooks close the parent's resources, not ours.
            _shutdown_hooks.clear()
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


def call_soon(callback: Callable[..., object], *args: Any) -> None:
    """Call ``callback(*args)`` on the shared loop from any thread, in the order of calls."""
    get_loop().call_soon_threadsafe(callback, *args)


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


# Shutdown phases, in the order DESIGN's "Shutdown order" gives: callers first (finish the
# submissions they accepted, apply orphan policies), then dispatchers (flush their ledger
# writes, close transports), then the services under them (receivers, drop-box readers).
PHASE_CALLERS: Final = 0
PHASE_DISPATCHERS: Final = 10
PHASE_SERVICES: Final = 20
_PHASE_BOUND: Final = {PHASE_CALLERS: None, PHASE_DISPATCHERS: 60.0, PHASE_SERVICES: 10.0}


def add_shutdown_hook(
    hook: Callable[[], Awaitable[None]], phase: int = PHASE_SERVICES
) -> None:
    """Run ``hook`` on the shared loop at interpreter exit, in ``phase`` order (hooks of one
    phase run newest first). Callers' hooks have no time bound: an accepted submission is
    finished as ``concurrent.futures`` finishes queued work at exit."""
    _shutdown_hooks.append((phase, hook))


def add_exit_closer(closer: Callable[[], None]) -> None:
    """Run a blocking ``closer`` at interpreter exit after the loop's hooks (ledgers close
    here, after every queued write has landed)."""
    _exit_closers.append(closer)


async def _run_hooks() -> None:
    for phase in sorted({phase for phase, _ in _shutdown_hooks}):
        hooks = [hook for p, hook in reversed(_shutdown_hooks) if p == phase]
        for hook in hooks:
            try:
                await asyncio.wait_for(hook(), _PHASE_BOUND.get(phase, 10.0))
            except Exception as exc:  # one failing hook must not stop the others
                log.warning("wove-adapters shutdown step %s failed: %r", _name(hook), exc)
    current = asyncio.current_task()
    leftovers = [task for task in asyncio.all_tasks() if task is not current]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


def _name(hook: Callable[..., Any]) -> str:
    return str(getattr(hook, "__qualname__", None) or repr(hook))


def is_shut_down() -> bool:
    """True once this process's exit shutdown has run (no new work is accepted)."""
    return _stopped and _pid in (None, os.getpid())


def shutdown() -> None:
    """Stop everything this process started, in order. Runs once, at interpreter exit
    (before the standard library refuses new thread work) or when called."""
    global _stopped
    if _stopped or _pid not in (None, os.getpid()):
        return
    _stopped = True
    loop = _loop
    if loop is not None and loop.is_running() and not on_loop():
        try:
            asyncio.run_coroutine_threadsafe(_run_hooks(), loop).result()
        except BaseException as exc:
            log.warning("wove-adapters shutdown did not finish: %r", exc)
        loop.call_soon_threadsafe(loop.stop)
    for closer in reversed(_exit_closers):
        try:
            closer()
        except Exception as exc:
            log.warning("wove-adapters exit step %s failed: %r", _name(closer), exc)


def _register_exit() -> None:
    """Register ``shutdown`` where it runs before ``concurrent.futures`` shuts its pools.

    ``threading._register_atexit`` hooks run (newest first) when the main thread finishes,
    before non-daemon threads are joined and before ``atexit``; ``concurrent.futures.thread``
    registers its own there on import, after which every ``ThreadPoolExecutor`` (the SQLite
    ledger's thread, ``asyncio.to_thread``) refuses work. Importing it first and registering
    after it makes ours run first. ``atexit`` stays as a fallback; ``shutdown`` runs once.
    """
    import concurrent.futures.thread  # noqa: F401 - must be registered before us

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(shutdown)
    atexit.register(shutdown)


_register_exit()
