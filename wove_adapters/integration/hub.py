"""``Hub``: the small front end for programs without wove.

Async is the source of truth; every sync method is one wrapper that runs the async one
on the shared background loop (``core.loop``). ``Hub(config=..., **overrides)`` is the
programmatic configuration source, above ``WOVE__*`` variables and the config file.

Front-end settings (``retries`` with ``retry_for``, ``timeout``, ``workers``,
``limit_per_minute``, ``max_pending``, ``error_mode``) are applied here, as wove applies
them; delivery policies are applied by the dispatcher under every front end alike.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import inspect
import os
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from wove_adapters.core import frames, logs
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.chunking import chunk_size, chunkable, note_task_seconds
from wove_adapters.core.codec import decode_outcome, exception_from_frame
from wove_adapters.core.config import Config, load_config
from wove_adapters.core.errors import (
    DeliveryOrphanedError,
    MissingDispatchFeatureError,
    TaskExecutionError,
)
from wove_adapters.core.ledger import (
    CANCELLED,
    FAILED,
    SUCCEEDED,
    TERMINAL_STATES,
    open_ledger,
)
from wove_adapters.core.policies import DeliveryPolicy, resolve_idempotency_key
from wove_adapters.core.retry import check_retry_for, retry_allowed
from wove_adapters.core.runtime import Dispatcher, Flag, Run
from wove_adapters.core.transport import RunAttempt
from wove_adapters.integration.environments import get_dispatcher, trusted_key_id

_MAP_KEYS = ("workers", "limit_per_minute", "max_pending", "error_mode")


def task_name_of(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "task" if name == "<lambda>" else str(name)


@functools.lru_cache(maxsize=1024)
def _signature(fn: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(fn)


def named_arguments(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name, for idempotency-key templates."""
    try:
        bound = _signature(fn).bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return {**{str(i): a for i, a in enumerate(args)}, **kwargs}
    named = dict(bound.arguments)
    for name, param in _signature(fn).parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
            named.update(named.pop(name))
    return named


class RunFuture(concurrent.futures.Future):
    """A ``concurrent.futures.Future`` that knows its run.

    It keeps the ``concurrent.futures`` contract: pending until the run is handed to the
    backend, then running (``cancel()`` returns False from there on, as for a thread
    pool; ``Hub.cancel(future)`` cancels a launched run for real), then finished.
    """

    run_id: str = ""
    _bridge: _Bridge | None = None

    def __init__(self) -> None:
        # ``concurrent.futures.Future.__init__`` less its ``threading.Condition`` (about
        # 400 bytes): a run can sit in flight for a long time, and the condition is needed
        # only once someone waits on the future or it is settled (``__getattr__``).
        self._state = "PENDING"
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Callable[[Any], object]] = []

    def __getattr__(self, name: str) -> Any:
        if name != "_condition":
            raise AttributeError(name)
        with _CONDITIONS:  # two threads touching it first must share one condition
            condition = self.__dict__.get("_condition")
            if condition is None:
                condition = self.__dict__["_condition"] = threading.Condition()
        return condition

    def cancel(self) -> bool:
        # Not a done callback: ``add_done_callback`` would make the condition at submit.
        cancelled = super().cancel()
        if cancelled and self._bridge is not None:
            self._bridge.cancelled()
        return cancelled


_CONDITIONS = threading.Lock()


class _Bridge:
    """One ``Hub.submit``'s way between the caller's ``RunFuture`` and its call on the
    shared loop. The call runs as a plain task that settles the future itself, with no
    second ``concurrent.futures.Future`` (``run_coroutine_threadsafe``'s) per run, and
    this one slotted object holds what three closures held: runs can be many and parked."""

    __slots__ = ("future", "task")

    def __init__(self, future: RunFuture) -> None:
        self.future = future
        self.task: asyncio.Task[Any] | None = None

    def begin(self, coro: Coroutine[Any, Any, Any]) -> None:
        """On the loop: start the call, unless the future was cancelled on its way here."""
        if self.future.cancelled():
            coro.close()
            return
        self.task = asyncio.get_running_loop().create_task(coro)
        self.task.add_done_callback(self.settle)

    def launched(self) -> None:
        # Runs on the loop thread, like ``settle``: a future settled first (a very short
        # run) is not moved back; one cancelled by another thread just says False.
        future = self.future
        if not future.done() and not future.running():
            with contextlib.suppress(RuntimeError):
                future.set_running_or_notify_cancel()

    def settle(self, done: asyncio.Task[Any]) -> None:
        self.task = None
        self.future._bridge = None  # no cycle left for the garbage collector
        _settle_future(self.future, done)

    def cancelled(self) -> None:
        """Any thread: a future cancelled before launch cancels its call on the loop (the
        run never launches). Scheduled after ``begin``, so the task exists by then."""
        shared_loop.call_soon(self._cancel_call)

    def _cancel_call(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()


# Every Hub not yet closed; interpreter exit closes them (PHASE_CALLERS), before the
# shared dispatchers stop, so their accepted submissions are finished first.
_open_hubs: weakref.WeakSet[Hub] = weakref.WeakSet()
# Bound on waiting for accepted submissions to reach their dispatcher at close.
_ACCEPT_BOUND = 60.0


async def _close_open_hubs() -> None:
    for hub in list(_open_hubs):
        await hub._close(reason="the program exited with the run in flight")


shared_loop.add_shutdown_hook(_close_open_hubs, shared_loop.PHASE_CALLERS)


class Hub:
    """Route callables to configured environments and get their results back."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        *,
        config_file: str | None = None,
        **overrides: Any,
    ) -> None:
        self.config: Config = load_config(config, config_file=config_file, **overrides)
        logs.apply_settings(self.config.defaults)  # log_level / log_format, once per process
        self._inflight: dict[str, Dispatcher] = {}
        # Calls accepted but not yet handed to a dispatcher: close waits for them.
        self._accepting: dict[str, Flag] = {}
        self._executors: weakref.WeakSet[HubExecutor] = weakref.WeakSet()
        self._closed = False
        self._closing: asyncio.Event | None = None
        self._settings_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        # Seconds each task took on its worker (moving average): sizes mapped chunks.
        self._task_seconds: dict[str, float] = {}
        self._resolved: dict[int, tuple[dict[str, Any], Dispatcher, DeliveryPolicy]] = {}
        _open_hubs.add(self)

    # ------------------------------------------------------------ context managers

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Hub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def close(self) -> None:
        """Finish accepted submissions and executor work, apply each in-flight run's
        orphan policy, and wait until every queued ledger write has landed."""
        if not self._closed:
            shared_loop.run_sync(self._close())

    async def aclose(self) -> None:
        if not self._closed:
            await shared_loop.run_async(self._close())

    async def _close(self, reason: str = "the Hub closed with the run in flight") -> None:
        """The shutdown order of DESIGN, for this Hub's runs (runs on the shared loop)."""
        if self._closing is not None:  # a second close waits for the first
            await self._closing.wait()
            return
        self._closing = asyncio.Event()
        try:
            # 1. Work handed to an executor runs, as concurrent.futures promises.
            for pool in list(self._executors):
                await pool._drain()
            self._closed = True
            # 2. Submissions already accepted reach their dispatcher (and the ledger).
            await asyncio.sleep(0)  # calls scheduled from other threads start first
            waiting = [event.wait() for event in self._accepting.values()]
            if waiting:
                await asyncio.wait(
                    [asyncio.ensure_future(w) for w in waiting], timeout=_ACCEPT_BOUND
                )
            # 3. What is still in flight gets its orphan policy.
            by_dispatcher: dict[int, tuple[Dispatcher, list[str]]] = {}
            for run_id, dispatcher in list(self._inflight.items()):
                by_dispatcher.setdefault(id(dispatcher), (dispatcher, []))[1].append(run_id)
            for dispatcher, run_ids in by_dispatcher.values():
                await dispatcher.abandon(run_ids, reason=reason)
            # 4. Every ledger write queued so far lands.
            dispatchers = {id(d): d for d in self._inflight.values()}
            dispatchers.update({id(d): d for _, d, _ in self._resolved.values()})
            for dispatcher in dispatchers.values():
                await dispatcher.flush()
        finally:
            self._closed = True
            _open_hubs.discard(self)
            self._closing.set()

    # ------------------------------------------------------------ async API

    async def arun(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` in its environment and return its result."""
        run_id = self._new_run_id(fn, task_options)
        frame = await shared_loop.run_async(
            self._call(fn, args, kwargs, environment, task_options, None, run_id)
        )
        return _value_of(frame)

    def asubmit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        """Start a run from async code; the returned future has ``run_id``."""
        run_id = self._new_run_id(fn, task_options)
        inner = asyncio.wrap_future(
            shared_loop.submit(
                self._call(fn, args, kwargs, environment, task_options, None, run_id)
            )
        )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def settle(done: asyncio.Future[Any]) -> None:
            if future.done():
                return
            if done.cancelled():
                future.cancel()
                return
            error = done.exception()
            if error is not None:
                future.set_exception(error)
                return
            try:
                future.set_result(_value_of(done.result()))
            except asyncio.CancelledError as exc:
                future.cancel(str(exc) or None)
            except BaseException as exc:
                future.set_exception(exc)
                if self._closed and isinstance(exc, DeliveryOrphanedError):
                    # The program closed the Hub with this run in flight: it chose not
                    # to wait, so asyncio need not log the orphaning as unretrieved.
                    future.exception()

        def propagate(done: asyncio.Future[Any]) -> None:
            if done.cancelled() and not inner.done():
                inner.cancel()

        inner.add_done_callback(settle)
        future.add_done_callback(propagate)
        future.run_id = run_id  # type: ignore[attr-defined]
        return future

    async def amap(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **call_settings: Any,
    ) -> list[Any]:
        """``fn(item)`` for each item, with call-level settings (workers, limit_per_minute,
        max_pending, error_mode, retries, timeout, delivery_*)."""
        outcome = await shared_loop.run_async(
            self._map(fn, list(items), environment, task_options, call_settings)
        )
        return _values_of(outcome)

    async def aresult(
        self, run_id: str, *, timeout: float | None = None, ledger: str | None = None
    ) -> Any:
        """The outcome of a run recorded in the ledger (detached runs, other processes)."""
        frame = await shared_loop.run_async(self._result(run_id, timeout, ledger))
        return _value_of(frame)

    async def acancel(self, run: str | Any, *, mode: str | None = None) -> None:
        run_id = run if isinstance(run, str) else run.run_id
        await shared_loop.run_async(self._cancel(run_id, mode))

    # ------------------------------------------------------------ sync API (one wrapper each)

    def run(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.submit(
            fn, *args, environment=environment, task_options=task_options, **kwargs
        ).result()

    def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RunFuture:
        future = RunFuture()
        future.run_id = self._new_run_id(fn, task_options)
        self._start(fn, args, kwargs, environment, task_options, future)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **call_settings: Any,
    ) -> list[Any]:
        outcome = shared_loop.run_sync(
            self._map(fn, list(items), environment, task_options, call_settings)
        )
        return _values_of(outcome)

    def result(
        self, run_id: str, *, timeout: float | None = None, ledger: str | None = None
    ) -> Any:
        return _value_of(shared_loop.run_sync(self._result(run_id, timeout, ledger)))

    def cancel(self, run: str | Any, *, mode: str | None = None) -> None:
        """Cancel a run (or a future from ``submit``), launched or not. With
        ``require_ack`` this waits for confirmation and raises CancelNotAcknowledgedError
        without it."""
        run_id = run if isinstance(run, str) else run.run_id
        shared_loop.run_sync(self._cancel(run_id, mode))

    def executor(
        self,
        environment: str | None = None,
        *,
        max_workers: int | None = None,
        **task_options: Any,
    ) -> HubExecutor:
        """A ``concurrent.futures.Executor`` whose work runs in ``environment``; at most
        ``max_workers`` of its calls are handed to the backend at once (the rest wait,
        cancellable, in submission order)."""
        pool = HubExecutor(self, environment, task_options, max_workers=max_workers)
        self._executors.add(pool)
        return pool

    def dispatcher(self, environment: str | None = None) -> Dispatcher:
        """The shared dispatcher behind an environment (for introspection and tests)."""
        name = self.config.resolve_environment_name(None, environment)
        settings = self.config.task_settings(None, environment=name)
        return shared_loop.run_sync(get_dispatcher(settings["environment"], settings))

    # ------------------------------------------------------------ futures (any thread)

    def _start(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        future: RunFuture,
    ) -> None:
        """Start ``future``'s run on the shared loop and settle ``future`` from it.

        The task's own exception (``SystemExit`` included) is set on the future, never
        raised on the shared loop, where it would stop every other run.
        """

        bridge = _Bridge(future)
        coro = self._call(fn, args, kwargs, environment, task_options, None, future.run_id,
                          on_launched=bridge.launched)
        future._bridge = bridge
        shared_loop.call_soon(bridge.begin, coro)

    # ------------------------------------------------------------ internals (shared loop)

    def _settings_for(
        self,
        task_name: str,
        environment: str | None,
        call_settings: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """Resolved settings, memoized: configuration does not change after load, and a
        mapped task resolves the same settings thousands of times."""
        key = (task_name, environment, repr(sorted((call_settings or {}).items())),
               repr(sorted(options.items())))
        settings = self._settings_cache.get(key)
        if settings is None:
            settings = self.config.task_settings(
                task_name,
                environment=environment,
                call_overrides=call_settings,
                task_overrides=options or None,
            )
            if len(self._settings_cache) < 4096:
                self._settings_cache[key] = settings
        return settings

    def _new_run_id(self, fn: Callable[..., Any], task_options: dict[str, Any] | None) -> str:
        return _run_id((task_options or {}).get("task_name") or task_name_of(fn))

    async def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        call_settings: dict[str, Any] | None,
        run_id: str,
        on_launched: Callable[[], None] | None = None,
        *,
        chunk: tuple[str, int, int] | None = None,
    ) -> dict[str, Any]:
        """One call with its retries and ``timeout``; returns the terminal frame.
        ``chunk``: the chunk of a mapped call its first attempt travels in.

        A failed attempt is retried while ``retries`` allow and its error is one
        ``retry_for`` names (any ``Exception`` without it; see ``core.retry``). Each retry
        is a new run (``<run_id>.retry<n>``) in the ledger, except a keyed run's task
        errors: the dispatcher retries those in place (same run, attempt + 1) and its
        final frame says how many retries that spent.

        Failures come back as frames, not raised: the front end raises them in the
        caller's own thread or loop (see ``_value_of``).
        """
        if self._closed:
            return _error_frame(run_id, RuntimeError(
                f"this Hub is closed; run {run_id} was not submitted (submit before "
                "close(), or open a new Hub)"))
        accepted = self._accepting[run_id] = Flag()
        try:
            try:
                task_name, settings = self._run_settings(
                    fn, environment, task_options, call_settings
                )
            except Exception as exc:  # bad configuration: the caller sees it as raised
                return _error_frame(run_id, exc)
            retries = int(settings.get("retries") or 0)
            timeout = settings.get("timeout")
            try:
                retry_for = check_retry_for(settings.get("retry_for"))
            except ValueError as exc:
                return _error_frame(run_id, exc)
            frame: dict[str, Any] = {}
            number = 0  # retries spent: by a new run here, or in place by the dispatcher
            while True:
                attempt_id = run_id if number == 0 else f"{run_id}.retry{number}"
                coro = self._deliver(
                    fn, args, kwargs, task_name, settings, attempt_id, accepted, on_launched,
                    in_place=(retries - number, retry_for) if retries > number else None,
                    chunk=chunk if number == 0 else None,
                )
                try:
                    frame = await (asyncio.wait_for(coro, float(timeout)) if timeout else coro)
                except asyncio.TimeoutError as exc:
                    error = TimeoutError(
                        f"task '{task_name}' exceeded timeout={timeout}s (run {attempt_id})"
                    )
                    error.__cause__ = exc
                    frame = _error_frame(attempt_id, error)
                except Exception as exc:  # setup failures: policy, dispatcher start-up
                    frame = _error_frame(attempt_id, exc)
                number += 1 + int(frame.pop("retried_in_place", 0) or 0)
                if number > retries or not retry_allowed(frame, retry_for) or self._closed:
                    return frame
        finally:
            accepted.set()
            self._accepting.pop(run_id, None)

    async def _resolve(self, settings: dict[str, Any]) -> tuple[Dispatcher, DeliveryPolicy]:
        """The dispatcher (started on first use) and delivery policy of these settings."""
        cached = self._resolved.get(id(settings))
        if cached is not None and cached[0] is settings:
            return cached[1], cached[2]
        environment = settings["environment"]
        dispatcher = await get_dispatcher(environment, settings)
        policy = DeliveryPolicy.from_settings(settings, where=f"Environment '{environment}'")
        if len(self._resolved) < 4096:
            self._resolved[id(settings)] = (settings, dispatcher, policy)
        return dispatcher, policy

    def _attempt(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_name: str,
        settings: dict[str, Any],
        run_id: str,
        policy: DeliveryPolicy,
        *,
        in_place: tuple[int, frozenset[str] | None] | None = None,
        chunk: tuple[str, int, int] | None = None,
    ) -> RunAttempt:
        """A run's first attempt (no awaiting: a mapped call makes thousands)."""
        environment = settings["environment"]
        raw_key = policy.idempotency_key
        key = (
            resolve_idempotency_key(raw_key, named_arguments(fn, args, kwargs), task_name)
            if raw_key is not None
            else None
        )
        func = functools.partial(fn, *args) if args else fn
        if settings.get("executor", "local") != "local":
            _require_cloudpickle()
        attempt = RunAttempt(
            run_id=run_id,
            task_id=task_name,
            func=func,
            args=dict(kwargs),
            policy=policy,
            idempotency_key=key,
            environment=environment,
            extra={"options": settings.get("executor_config", {}).get("task_options", {})},
        )
        if chunk is not None:  # given only where chunkable (``_chunk_size``)
            attempt.extra["chunk"] = chunk
        if policy.controls.active:  # task controls key on every argument, by name
            attempt.extra["named_args"] = named_arguments(fn, args, kwargs)
        if key is not None and in_place is not None:
            # A keyed run's task errors are retried in place by the dispatcher: one run in
            # the ledger, attempt + 1 (its frame says how many it spent).
            attempt.extra["in_place_retries"] = in_place
        return attempt

    def _outcome_listener(
        self, task_name: str
    ) -> tuple[asyncio.Future[dict[str, Any]], Callable[[dict[str, Any]], None]]:
        """A future for the run's terminal frame, and the listener that sets it."""
        outcome: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        def listener(frame: dict[str, Any]) -> None:
            if frame.get("type") in frames.TERMINAL_EVENTS and not outcome.done():
                outcome.set_result(frame)
                elapsed = frame.get("elapsed")
                if elapsed is not None:
                    note_task_seconds(self._task_seconds, task_name, float(elapsed))

        return outcome, listener

    async def _deliver(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_name: str,
        settings: dict[str, Any],
        run_id: str,
        accepted: Flag,
        on_launched: Callable[[], None] | None,
        *,
        in_place: tuple[int, frozenset[str] | None] | None = None,
        chunk: tuple[str, int, int] | None = None,
    ) -> dict[str, Any]:
        dispatcher, policy = await self._resolve(settings)
        attempt = self._attempt(
            fn, args, kwargs, task_name, settings, run_id, policy, in_place=in_place, chunk=chunk
        )
        outcome, listener = self._outcome_listener(task_name)
        self._inflight[run_id] = dispatcher
        try:
            # A plain run is accepted without suspending (no task, nothing to tear).
            run = dispatcher.submit_now(attempt, listener)
            if run is None:
                # Once accepted, a submission is not torn in half by a cancelled caller:
                # the run is created (and recorded), then cancelled below.
                submitting = asyncio.ensure_future(dispatcher.submit(attempt, listener))
                try:
                    run = await asyncio.shield(submitting)
                except asyncio.CancelledError:
                    with contextlib.suppress(Exception):
                        await submitting
                        await dispatcher.cancel(run_id)
                    raise
                finally:
                    accepted.set()
                del submitting  # done; a parked run keeps no Task of its submission
            accepted.set()
            del attempt  # the run holds it; nothing here keeps the callable alive
            if on_launched is not None:
                _when_launched(run, on_launched)
            try:
                # Not shielded: the outcome future is this call's alone, and a cancelled
                # wait may cancel it (the listener sets only a pending one).
                return await outcome
            except asyncio.CancelledError:
                # The caller gave up (future cancelled, timeout): cancel the run for real.
                with contextlib.suppress(Exception):
                    await dispatcher.cancel(run_id)
                raise
        finally:
            self._inflight.pop(run_id, None)

    async def _map_direct(
        self,
        fn: Callable[..., Any],
        items: list[Any],
        task_name: str,
        settings: dict[str, Any],
        error_mode: str,
        chunk_of: Callable[[int], tuple[str, int, int] | None],
    ) -> tuple[str, list[dict[str, Any]]]:
        """A mapped call whose runs nothing paces, retries or times out one by one: each
        run goes straight to its dispatcher from here, with no task of its own per item
        (``_call``'s per-run machinery costs more than a short task's whole round trip).
        Cancelling the call cancels every run it still has in flight."""
        outcomes: list[asyncio.Future[dict[str, Any]]] = []
        live: list[tuple[str, Dispatcher, asyncio.Future[dict[str, Any]]]] = []
        try:
            resolved: tuple[Dispatcher, DeliveryPolicy] | None = None
            for index, item in enumerate(items):
                run_id = _run_id(task_name)  # the name _map resolved, as _new_run_id would
                outcome, listener = self._outcome_listener(task_name)
                outcomes.append(outcome)
                try:
                    if resolved is None:
                        resolved = await self._resolve(settings)
                    dispatcher = resolved[0]
                    attempt = self._attempt(
                        fn, (item,), {}, task_name, settings, run_id, resolved[1],
                        chunk=chunk_of(index),
                    )
                    self._inflight[run_id] = dispatcher
                    live.append((run_id, dispatcher, outcome))
                    if dispatcher.submit_now(attempt, listener) is None:
                        await dispatcher.submit(attempt, listener)
                except Exception as exc:  # this run's setup failed: its error is its frame
                    if not outcome.done():
                        outcome.set_result(_error_frame(run_id, exc))
            return await _collect(outcomes, error_mode)
        finally:
            for run_id, _, _ in live:
                self._inflight.pop(run_id, None)
            for run_id, dispatcher, outcome in live:  # the call ended without them
                if not outcome.done():
                    with contextlib.suppress(Exception):
                        await dispatcher.cancel(run_id)

    async def _map(
        self,
        fn: Callable[..., Any],
        items: list[Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        call_settings: dict[str, Any],
    ) -> tuple[str, list[dict[str, Any]]]:
        """Every item's terminal frame, with the error mode; ``_values_of`` raises."""
        task_name = (task_options or {}).get("task_name") or task_name_of(fn)
        settings = self.config.task_settings(
            task_name, environment=environment, call_overrides=call_settings
        )
        error_mode = settings.get("error_mode") or "raise"
        max_pending = settings.get("max_pending")
        if max_pending is not None and len(items) > int(max_pending):
            error = RuntimeError(
                f"Mapped task '{task_name}' has {len(items)} items, which exceeds "
                f"max_pending={max_pending}."
            )
            return "raise", [_error_frame("", error)]
        workers = settings.get("workers")
        limiter = asyncio.Semaphore(int(workers)) if workers else None
        per_minute = settings.get("limit_per_minute")
        spacing = 60.0 / float(per_minute) if per_minute else 0.0
        start = time.monotonic()
        passthrough = {k: v for k, v in call_settings.items() if k not in _MAP_KEYS}
        try:
            resolved: tuple[str, dict[str, Any]] | None = self._run_settings(
                fn, environment, task_options, passthrough
            )
        except Exception:
            resolved = None  # each run reports its own configuration error
        try:
            size = 1 if limiter or spacing or resolved is None else await self._chunk_size(
                *resolved, len(items)
            )
        except ValueError as exc:
            return "raise", [_error_frame("", exc)]
        call_id = uuid.uuid4().hex

        def chunk_of(index: int) -> tuple[str, int, int] | None:
            if size <= 1:
                return None
            number = index // size
            return call_id, number, min(size, len(items) - number * size)

        one_by_one = resolved is None or bool(
            int(resolved[1].get("retries") or 0) or resolved[1].get("timeout")
        )
        if resolved is not None and not (one_by_one or limiter or spacing or self._closed):
            # Nothing paces, retries or times the runs out one by one: no task per run.
            return await self._map_direct(
                fn, items, *resolved, error_mode, chunk_of
            )

        async def one(index: int, item: Any) -> dict[str, Any]:
            if spacing:
                await asyncio.sleep(max(0.0, start + index * spacing - time.monotonic()))
            run_id = self._new_run_id(fn, task_options)
            call = self._call(fn, (item,), {}, environment, task_options, passthrough, run_id,
                              chunk=chunk_of(index))
            if limiter is None:
                return await call
            async with limiter:
                return await call

        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
        try:
            return await _collect(tasks, error_mode)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _run_settings(
        self,
        fn: Callable[..., Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        call_settings: dict[str, Any] | None,
    ) -> tuple[str, dict[str, Any]]:
        """(task name, settings) of a call of ``fn``: its task options (``task_name``,
        ``environment``) over the call's environment. Raises what the settings refuse."""
        options = dict(task_options or {})
        task_name = options.pop("task_name", None) or task_name_of(fn)
        task_env = options.pop("environment", None)
        return task_name, self._settings_for(
            task_name, task_env or environment, call_settings, options
        )

    async def _chunk_size(self, task_name: str, settings: dict[str, Any], runs: int) -> int:
        """How many runs of this mapped call travel in one backend message
        (``core.chunking.chunk_size``; 1 where ``chunkable`` says chunks cannot keep a
        promise). Raises ValueError for a bad ``map_chunk_size``."""
        try:
            policy = DeliveryPolicy.from_settings(
                settings, where=f"Environment '{settings['environment']}'"
            )
        except Exception:
            return 1  # each run reports its own configuration error
        size = chunk_size(settings.get("map_chunk_size", "auto"), runs,
                          self._task_seconds.get(task_name), policy.max_in_flight)
        if size <= 1 or settings.get("executor", "local") == "local":
            return 1
        try:
            dispatcher = await get_dispatcher(settings["environment"], settings)
        except Exception:
            return 1  # the first run reports why the environment did not start
        keyed = policy.idempotency_key is not None
        return size if chunkable(policy, dispatcher.transport, keyed=keyed) else 1

    async def _result(
        self, run_id: str, timeout: float | None, ledger_url: str | None
    ) -> dict[str, Any]:
        """A recorded run's terminal frame, from the ledger its environment uses."""
        urls = [ledger_url] if ledger_url else self._ledger_urls()
        ledger = record = None
        for url in urls:
            ledger = open_ledger(url)
            record = await ledger.get(run_id)
            if record is not None:
                break
        if record is None or ledger is None:
            where = ", ".join(open_ledger(url).url for url in urls)
            raise KeyError(f"run {run_id} is not in the ledger ({where})")
        if record.outcome is None and record.state not in TERMINAL_STATES:
            found = await ledger.wait_outcome(run_id, timeout=timeout)
            if found is None or (found.outcome is None and found.state not in TERMINAL_STATES):
                raise TimeoutError(
                    f"run {run_id} has no outcome yet (state {record.state}) in {ledger.url}"
                )
            record = found
        if record.outcome is None and record.state == SUCCEEDED:
            raise LookupError(
                f"run {run_id} succeeded, but its value was not kept in {ledger.url}: only "
                "runs with a delivery_idempotency_key or delivery_orphan_policy='detach' "
                "keep their value for later retrieval"
            )
        if record.outcome is None:  # a terminal state recorded without an event
            reason = f"run {run_id} ended {record.state} (no outcome was recorded)"
            if record.state == CANCELLED:
                return {"type": frames.TASK_CANCELLED, "run_id": run_id, "reason": reason}
            error: Exception = DeliveryOrphanedError(reason, run_id=run_id)
            if record.state == FAILED:
                error = TaskExecutionError({"kind": "Error", "message": reason})
            return _error_frame(run_id, error)
        key_id = trusted_key_id(self.config, record.environment)
        return await asyncio.to_thread(
            functools.partial(decode_outcome, record.outcome, run_id, key_id=key_id)
        )

    def _ledger_urls(self) -> list[str | None]:
        """The configured ledger, then every environment's own, in order, deduplicated."""
        urls: list[str | None] = [self.config.ledger]
        for name in sorted(self.config.environments):
            with contextlib.suppress(Exception):
                url = self.config.environment_settings(name).get("ledger")
                if url not in urls:
                    urls.append(url)
        return urls

    async def _cancel(self, run_id: str, mode: str | None) -> None:
        accepting = self._accepting.get(run_id)
        if accepting is not None:
            # Submitted a moment ago and still on its way to the dispatcher: cancel it
            # once it is there, rather than letting the cancel fall through the gap.
            await accepting.wait()
        dispatcher = self._inflight.get(run_id)
        if dispatcher is None:
            return
        await dispatcher.cancel(run_id, mode)


async def _collect(
    outcomes: Sequence[Awaitable[dict[str, Any]]], error_mode: str
) -> tuple[str, list[dict[str, Any]]]:
    """A mapped call's terminal frames: all of them (``error_mode="return"``), or, in
    "raise" mode, the first that is not a result as soon as it comes. The caller cancels
    what is left."""
    if error_mode == "return":
        return "return", list(await asyncio.gather(*outcomes))
    frames_in_order: list[asyncio.Future[dict[str, Any]]] = [
        asyncio.ensure_future(outcome) for outcome in outcomes
    ]
    # One waiter for the whole call, not ``as_completed``'s coroutine and queue hop per
    # run: it wakes once, on the first frame that is not a result or when all are in.
    waiter: asyncio.Future[asyncio.Future[dict[str, Any]] | None] = (
        asyncio.get_running_loop().create_future()
    )
    left = len(frames_in_order)

    def arrived(done: asyncio.Future[dict[str, Any]]) -> None:
        nonlocal left
        left -= 1
        if waiter.done():
            return
        if done.cancelled() or done.exception() is not None:
            waiter.set_result(done)
        elif done.result().get("type") != frames.TASK_RESULT:
            waiter.set_result(done)
        elif left == 0:
            waiter.set_result(None)

    if not frames_in_order:
        waiter.set_result(None)
    for future in frames_in_order:
        future.add_done_callback(arrived)
    try:
        first_failed = await waiter
    finally:
        for future in frames_in_order:
            future.remove_done_callback(arrived)
    if first_failed is not None:
        return "raise", [first_failed.result()]
    return "raise", [done.result() for done in frames_in_order]


def _when_launched(run: Run, callback: Callable[[], None]) -> None:
    """Call ``callback`` once ``run`` has been handed to its backend (or at once)."""
    if run.launched or run.launch_task is None:
        callback()
        return
    run.launch_task.add_done_callback(lambda _: callback() if run.launched else None)


def _run_id(task_name: str) -> str:
    # 128 random bits as 32 hex digits, like a uuid4's hex without the object
    return f"{task_name}:{os.urandom(16).hex()}"


def _error_frame(run_id: str, error: BaseException) -> dict[str, Any]:
    return {"type": frames.TASK_ERROR, "run_id": run_id, "exception": error,
            "error": {"kind": type(error).__name__, "message": str(error), "source": "hub"}}


def _value_of(frame: dict[str, Any]) -> Any:
    """The run's value, or its exception raised in the caller's own context."""
    kind = frame.get("type")
    if kind == frames.TASK_RESULT:
        return frame.get("result")
    if kind == frames.TASK_CANCELLED:
        raise asyncio.CancelledError(frame.get("reason") or "the run was cancelled")
    raise exception_from_frame(frame)


def _values_of(outcome: tuple[str, list[dict[str, Any]]]) -> list[Any]:
    mode, results = outcome
    if mode == "return":
        values: list[Any] = []
        for frame in results:
            try:
                values.append(_value_of(frame))
            except BaseException as exc:
                values.append(exc)
        return values
    return [_value_of(frame) for frame in results]


def _settle_future(
    future: RunFuture, done: concurrent.futures.Future[Any] | asyncio.Future[Any]
) -> None:
    """Resolve a caller's future from its call's outcome (on the loop thread)."""
    if future.done():
        return
    if done.cancelled():
        future.cancel()
        return
    error = done.exception()
    if error is not None:  # a bug in the hub itself: still the caller's to see
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            future.set_exception(error)
        return
    frame = done.result()
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if frame.get("type") == frames.TASK_RESULT:
            future.set_result(frame.get("result"))
        elif frame.get("type") == frames.TASK_CANCELLED:
            reason = frame.get("reason") or "the run was cancelled"
            if not future.cancel():  # running: cancelled for real, by Hub.cancel or the backend
                future.set_exception(concurrent.futures.CancelledError(reason))
        else:
            future.set_exception(exception_from_frame(frame))


def _require_cloudpickle() -> None:
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        raise MissingDispatchFeatureError(
            "tasks routed to another process are pickled with cloudpickle"
        ) from None


class HubExecutor(concurrent.futures.Executor):
    """``concurrent.futures`` face of one environment, with that contract: every keyword
    of ``submit`` goes to ``fn``; at most ``max_workers`` calls are handed to the backend
    at once and the rest wait here, cancellable; submitted work runs even if the program
    exits without ``shutdown`` (as a thread pool's does); ``shutdown(cancel_futures=True)``
    cancels what has not started."""

    def __init__(
        self,
        hub: Hub,
        environment: str | None,
        task_options: dict[str, Any],
        *,
        max_workers: int | None = None,
    ) -> None:
        if max_workers is not None and max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        self._hub = hub
        self._environment = environment
        self._task_options = dict(task_options) or None
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._queue: collections.deque[
            tuple[RunFuture, Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ] = collections.deque()
        self._futures: set[RunFuture] = set()
        self._active = 0
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RunFuture:
        future = RunFuture()
        future.run_id = self._hub._new_run_id(fn, self._task_options)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if shared_loop.is_shut_down():
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            self._futures.add(future)
            if self._max_workers is not None and self._active >= self._max_workers:
                self._queue.append((future, fn, args, kwargs))
                return future
            self._active += 1
        self._launch(future, fn, args, kwargs)
        return future

    def _launch(
        self,
        future: RunFuture,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        future.add_done_callback(self._finished)
        self._hub._start(fn, args, kwargs, self._environment, self._task_options, future)

    def _finished(self, future: concurrent.futures.Future[Any]) -> None:
        """A slot is free: launch the next queued call that was not cancelled."""
        while True:
            with self._lock:
                self._futures.discard(future)
                if not self._queue:
                    self._active -= 1
                    return
                nxt, fn, args, kwargs = self._queue.popleft()
                if nxt.cancelled():
                    self._futures.discard(nxt)
                    continue
            self._launch(nxt, fn, args, kwargs)
            return

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                queued = list(self._queue)
                self._queue.clear()
            else:
                queued = []
        for future, *_ in queued:
            future.cancel()
            with self._lock:
                self._futures.discard(future)
        if wait:
            with self._lock:
                pending = list(self._futures)
            concurrent.futures.wait(pending)

    async def _drain(self) -> None:
        """Hub close and interpreter exit: every submitted call finishes (shared loop)."""
        while True:
            with self._lock:
                pending = [f for f in self._futures if not f.done()]
            if not pending:
                return
            await asyncio.wait([asyncio.wrap_future(f) for f in pending])
