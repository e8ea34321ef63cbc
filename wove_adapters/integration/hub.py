"""``Hub``: the small front end for programs without wove.

Async is the source of truth; every sync method is one wrapper that runs the async one
on the shared background loop (``core.loop``). ``Hub(config=..., **overrides)`` is the
programmatic configuration source, above ``WOVE__*`` variables and the config file.

Front-end settings (``retries``, ``timeout``, ``workers``, ``limit_per_minute``,
``max_pending``, ``error_mode``) are applied here, as wove applies them; delivery
policies are applied by the dispatcher under every front end alike.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.config import Config, load_config
from wove_adapters.core.errors import (
    CancelNotAcknowledgedError,
    MissingDispatchFeatureError,
    WoveAdaptersError,
)
from wove_adapters.core.ledger import open_ledger
from wove_adapters.core.policies import DeliveryPolicy, resolve_idempotency_key
from wove_adapters.core.runtime import Dispatcher, decode_outcome, exception_from_frame
from wove_adapters.core.transport import RunAttempt
from wove_adapters.integration.environments import get_dispatcher

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
    """A ``concurrent.futures.Future`` that knows its run."""

    run_id: str = ""


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
        self._inflight: dict[str, Dispatcher] = {}
        self._closed = False
        self._settings_cache: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._resolved: dict[int, tuple[dict[str, Any], Dispatcher, DeliveryPolicy]] = {}

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
        if not self._closed:
            shared_loop.run_sync(self._close())

    async def aclose(self) -> None:
        if not self._closed:
            await shared_loop.run_async(self._close())

    async def _close(self) -> None:
        """Runs still in flight get their orphan policy; queued ledger writes land."""
        self._closed = True
        by_dispatcher: dict[int, tuple[Dispatcher, list[str]]] = {}
        for run_id, dispatcher in list(self._inflight.items()):
            by_dispatcher.setdefault(id(dispatcher), (dispatcher, []))[1].append(run_id)
        for dispatcher, run_ids in by_dispatcher.values():
            await dispatcher.abandon(run_ids, reason="the Hub closed with the run in flight")
        for dispatcher, _ in by_dispatcher.values():
            await dispatcher.flush()

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
        return await shared_loop.run_async(
            self._call(fn, args, kwargs, environment, task_options, None, run_id)
        )

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
        future = asyncio.wrap_future(
            shared_loop.submit(
                self._call(fn, args, kwargs, environment, task_options, None, run_id)
            )
        )
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
        return await shared_loop.run_async(
            self._map(fn, list(items), environment, task_options, call_settings)
        )

    async def aresult(
        self, run_id: str, *, timeout: float | None = None, ledger: str | None = None
    ) -> Any:
        """The outcome of a run recorded in the ledger (detached runs, other processes)."""
        return await shared_loop.run_async(self._result(run_id, timeout, ledger))

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
        run_id = self._new_run_id(fn, task_options)
        inner = shared_loop.submit(
            self._call(fn, args, kwargs, environment, task_options, None, run_id)
        )
        inner.run_id = run_id  # type: ignore[attr-defined]
        return inner  # type: ignore[return-value]

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        environment: str | None = None,
        task_options: dict[str, Any] | None = None,
        **call_settings: Any,
    ) -> list[Any]:
        return shared_loop.run_sync(
            self._map(fn, list(items), environment, task_options, call_settings)
        )

    def result(
        self, run_id: str, *, timeout: float | None = None, ledger: str | None = None
    ) -> Any:
        return shared_loop.run_sync(self._result(run_id, timeout, ledger))

    def cancel(self, run: str | Any, *, mode: str | None = None) -> None:
        """Cancel a run (or a future from ``submit``). With ``require_ack`` this waits for
        confirmation and raises CancelNotAcknowledgedError without it."""
        run_id = run if isinstance(run, str) else run.run_id
        shared_loop.run_sync(self._cancel(run_id, mode))

    def executor(self, environment: str | None = None, **task_options: Any) -> HubExecutor:
        """A ``concurrent.futures.Executor`` whose work runs in ``environment``."""
        return HubExecutor(self, environment, task_options)

    def dispatcher(self, environment: str | None = None) -> Dispatcher:
        """The shared dispatcher behind an environment (for introspection and tests)."""
        name = self.config.resolve_environment_name(None, environment)
        settings = self.config.task_settings(None, environment=name)
        return shared_loop.run_sync(get_dispatcher(settings["environment"], settings))

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
        name = (task_options or {}).get("task_name") or task_name_of(fn)
        return f"{name}:{uuid.uuid4().hex}"

    async def _call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        call_settings: dict[str, Any] | None,
        run_id: str,
    ) -> Any:
        if self._closed:
            raise RuntimeError("this Hub is closed")
        options = dict(task_options or {})
        task_name = options.pop("task_name", None) or task_name_of(fn)
        task_env = options.pop("environment", None)
        settings = self._settings_for(task_name, task_env or environment, call_settings, options)
        retries = int(settings.get("retries") or 0)
        timeout = settings.get("timeout")
        last: BaseException | None = None
        for number in range(retries + 1):
            attempt_id = run_id if number == 0 else f"{run_id}.retry{number}"
            try:
                coro = self._deliver(fn, args, kwargs, task_name, settings, attempt_id)
                if timeout:
                    return await asyncio.wait_for(coro, float(timeout))
                return await coro
            except (asyncio.CancelledError, CancelNotAcknowledgedError):
                raise
            except WoveAdaptersError as exc:  # DeliveryTimeoutError is a TimeoutError too
                last = exc
            except asyncio.TimeoutError as exc:
                last = TimeoutError(
                    f"task '{task_name}' exceeded timeout={timeout}s (run {attempt_id})"
                )
                last.__cause__ = exc
            except Exception as exc:
                last = exc
        assert last is not None
        raise last

    async def _deliver(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_name: str,
        settings: dict[str, Any],
        run_id: str,
    ) -> Any:
        environment = settings["environment"]
        cached = self._resolved.get(id(settings))
        if cached is None or cached[0] is not settings:
            dispatcher = await get_dispatcher(environment, settings)
            policy = DeliveryPolicy.from_settings(settings, where=f"Environment '{environment}'")
            if len(self._resolved) < 4096:
                self._resolved[id(settings)] = (settings, dispatcher, policy)
        else:
            _, dispatcher, policy = cached
        raw_key = policy.idempotency_key
        key = (
            resolve_idempotency_key(raw_key, named_arguments(fn, args, kwargs), task_name)
            if raw_key is not None
            else None
        )
        func = functools.partial(fn, *args) if args else fn
        if settings.get("executor", "local") != "local":
            _require_cloudpickle()
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[dict[str, Any]] = loop.create_future()

        def listener(frame: dict[str, Any]) -> None:
            if frame.get("type") in frames.TERMINAL_EVENTS and not outcome.done():
                outcome.set_result(frame)

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
        self._inflight[run_id] = dispatcher
        try:
            await dispatcher.submit(attempt, listener)
            try:
                frame = await asyncio.shield(outcome)
            except asyncio.CancelledError:
                # The caller gave up (future cancelled, timeout): cancel the run for real.
                with contextlib.suppress(Exception):
                    await dispatcher.cancel(run_id)
                raise
        finally:
            self._inflight.pop(run_id, None)
        return _value_of(frame)

    async def _map(
        self,
        fn: Callable[..., Any],
        items: list[Any],
        environment: str | None,
        task_options: dict[str, Any] | None,
        call_settings: dict[str, Any],
    ) -> list[Any]:
        task_name = (task_options or {}).get("task_name") or task_name_of(fn)
        settings = self.config.task_settings(
            task_name, environment=environment, call_overrides=call_settings
        )
        max_pending = settings.get("max_pending")
        if max_pending is not None and len(items) > int(max_pending):
            raise RuntimeError(
                f"Mapped task '{task_name}' has {len(items)} items, which exceeds "
                f"max_pending={max_pending}."
            )
        workers = settings.get("workers")
        limiter = asyncio.Semaphore(int(workers)) if workers else None
        per_minute = settings.get("limit_per_minute")
        spacing = 60.0 / float(per_minute) if per_minute else 0.0
        error_mode = settings.get("error_mode") or "raise"
        start = time.monotonic()
        passthrough = {k: v for k, v in call_settings.items() if k not in _MAP_KEYS}

        async def one(index: int, item: Any) -> Any:
            if spacing:
                await asyncio.sleep(max(0.0, start + index * spacing - time.monotonic()))
            run_id = self._new_run_id(fn, task_options)
            call = self._call(fn, (item,), {}, environment, task_options, passthrough, run_id)
            if limiter is None:
                return await call
            async with limiter:
                return await call

        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
        if error_mode == "return":
            return list(await asyncio.gather(*tasks, return_exceptions=True))
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _result(self, run_id: str, timeout: float | None, ledger_url: str | None) -> Any:
        ledger = open_ledger(ledger_url or self.config.ledger)
        record = await ledger.get(run_id)
        if record is None:
            raise KeyError(f"run {run_id} is not in the ledger {ledger.url}")
        if record.outcome is None:
            found = await ledger.wait_outcome(run_id, timeout=timeout)
            if found is None or found.outcome is None:
                raise TimeoutError(
                    f"run {run_id} has no outcome yet (state {record.state}) in {ledger.url}"
                )
            record = found
        assert record.outcome is not None
        frame = await asyncio.to_thread(decode_outcome, record.outcome, run_id)
        return _value_of(frame)

    async def _cancel(self, run_id: str, mode: str | None) -> None:
        dispatcher = self._inflight.get(run_id)
        if dispatcher is None:
            return
        await dispatcher.cancel(run_id, mode)


def _value_of(frame: dict[str, Any]) -> Any:
    kind = frame.get("type")
    if kind == frames.TASK_RESULT:
        return frame.get("result")
    if kind == frames.TASK_CANCELLED:
        raise asyncio.CancelledError(frame.get("reason") or "the run was cancelled")
    raise exception_from_frame(frame)


def _require_cloudpickle() -> None:
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        raise MissingDispatchFeatureError(
            "tasks routed to another process are pickled with cloudpickle"
        ) from None


class HubExecutor(concurrent.futures.Executor):
    """``concurrent.futures`` face of one environment."""

    def __init__(self, hub: Hub, environment: str | None, task_options: dict[str, Any]) -> None:
        self._hub = hub
        self._environment = environment
        self._task_options = task_options or None
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> RunFuture:
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        future = self._hub.submit(
            fn, *args, environment=self._environment, task_options=self._task_options, **kwargs
        )
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._shutdown = True
        if cancel_futures:
            for future in list(self._futures):
                future.cancel()
        if wait:
            concurrent.futures.wait(list(self._futures))
