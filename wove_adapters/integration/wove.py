"""The wove bridge: our executors inside a real ``wove`` 2.x weave.

``executor(name)`` returns an object a wove environment definition accepts as its
``executor``::

    import wove
    from wove_adapters.integration.wove import executor
    wove.config(environments={"batch": {"executor": executor("process")}})
    with wove.weave() as w:
        @w.do(environment="batch")
        def step(): ...

wove starts and stops executors once per weave; ours only borrow the shared, warm
dispatcher (receiver, worker pools, backend clients), so a weave pays a few milliseconds
for it. Frames are forwarded as wove sends them; events come back in wove's dict shape,
``task_error`` carrying the original exception so wove raises it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.config import load_config
from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.policies import DeliveryPolicy, resolve_idempotency_key
from wove_adapters.core.runtime import Dispatcher
from wove_adapters.core.transport import RunAttempt
from wove_adapters.integration.environments import get_dispatcher

_WOVE_DEFAULTS = {"delivery_cancel_mode": "best_effort", "delivery_orphan_policy": "cancel"}


def _wove_base() -> type:
    try:
        from wove.environment import EnvironmentExecutor
    except ImportError:
        raise MissingBackendError("wove bridge", "wove", "wove") from None
    return EnvironmentExecutor


class _Bridge:
    """Implementation; ``executor()`` mixes it with wove's abstract base class."""

    def __init__(self, name: str, settings: dict[str, Any]) -> None:
        self._name = name
        self._settings = settings
        self._dispatcher: Dispatcher | None = None
        self._events: asyncio.Queue[dict[str, Any]] | None = None
        self._caller_loop: asyncio.AbstractEventLoop | None = None
        self._runs: set[str] = set()

    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        settings = dict(self._settings)
        if environment_config:
            merged = dict(settings.get("executor_config") or {})
            merged.update(environment_config)
            settings["executor_config"] = merged
        self._caller_loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._dispatcher = await shared_loop.run_async(get_dispatcher(self._name, settings))

    def _deliver(self, frame: dict[str, Any]) -> None:
        assert self._caller_loop is not None and self._events is not None
        if frame.get("type") in frames.TERMINAL_EVENTS:
            self._runs.discard(frame.get("run_id", ""))
        with contextlib.suppress(RuntimeError):  # the weave's loop already closed
            self._caller_loop.call_soon_threadsafe(self._events.put_nowait, frame)

    async def send(self, frame: dict[str, Any]) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None:
            raise RuntimeError("executor is not started")
        kind = frame.get("type")
        if kind == frames.RUN_TASK:
            delivery = {k: v for k, v in (frame.get("delivery") or {}).items() if v is not None}
            # wove always sends its resolved defaults; where it only has its default and
            # our environment sets the policy, ours wins.
            for name, wove_default in _WOVE_DEFAULTS.items():
                if delivery.get(name) == wove_default and self._settings.get(name):
                    delivery.pop(name)
            settings = {**self._settings, **delivery}
            policy = DeliveryPolicy.from_settings(settings, where=f"Environment '{self._name}'")
            args = dict(frame.get("args") or {})
            task_id = str(frame.get("task_id", ""))
            key = delivery.get("delivery_idempotency_key")
            if key is None:
                key = resolve_idempotency_key(policy.idempotency_key, args, task_id)
            attempt = RunAttempt(
                run_id=frame["run_id"],
                task_id=task_id,
                func=frame["callable"],
                args=args,
                policy=policy,
                idempotency_key=None if key is None else str(key),
                environment=self._name,
            )
            self._runs.add(attempt.run_id)
            await shared_loop.run_async(dispatcher.submit(attempt, self._deliver))
        elif kind == frames.CANCEL_TASK:
            run_id = frame.get("run_id", "")
            mode = frame.get("delivery_cancel_mode")
            # As for run_task: wove's own default gives way to our environment's setting.
            default = _WOVE_DEFAULTS["delivery_cancel_mode"]
            if mode == default and self._settings.get("delivery_cancel_mode"):
                mode = None  # the run's own policy (this environment's) decides
            shared_loop.submit(_quiet(dispatcher.cancel(run_id, mode)))
        elif kind == frames.SHUTDOWN:
            await self._abandon()
        else:
            raise ValueError(f"Unsupported frame type: {kind}")

    async def recv(self) -> dict[str, Any]:
        assert self._events is not None
        return await self._events.get()

    async def stop(self) -> None:
        await self._abandon()
        self._dispatcher = None

    async def _abandon(self) -> None:
        if self._dispatcher is not None and self._runs:
            runs, self._runs = list(self._runs), set()
            await shared_loop.run_async(
                self._dispatcher.abandon(runs, reason="the weave stopped with the run in flight")
            )


async def _quiet(coro: Any) -> None:
    with contextlib.suppress(Exception):
        await coro


def executor(
    name: str = "process",
    *,
    config: dict[str, Any] | None = None,
    executor_config: dict[str, Any] | None = None,
    **settings: Any,
) -> Any:
    """A wove ``EnvironmentExecutor`` running tasks through one of our executors.

    ``name`` is one of our configured environments (settings come from our layered
    configuration) or an executor name (``process``, ``stdio``, ``celery``, ...)."""
    base = _wove_base()
    cfg = load_config(config)
    if name in cfg.environments:
        resolved = cfg.environment_settings(name)
    else:
        _require_executor_name(name, sorted(cfg.environments))
        resolved = cfg.environment_settings(cfg.default_environment)
        resolved["executor"] = name
        resolved["executor_config"] = {}
    if executor_config:
        resolved["executor_config"] = {**(resolved.get("executor_config") or {}), **executor_config}
    resolved.update(settings)
    from wove_adapters.integration.environments import build_transport

    build_transport(resolved["executor"])  # unknown names fail here, at construction
    bridge_cls = type("WoveAdaptersExecutor", (_Bridge, base), {})
    return bridge_cls(name, resolved)


def _require_executor_name(name: str, environments: list[str]) -> None:
    """``name`` is not a configured environment: it must be an executor name. Say both
    lists when it is neither, because the caller may have meant either (a typo in an
    environment name would otherwise read as an unknown *executor*)."""
    from wove_adapters.adapters.registry import executor_names

    executors = executor_names()
    if name in executors:
        return
    import difflib

    configured = ", ".join(environments) if environments else "none"
    close = difflib.get_close_matches(name, [*environments, *executors], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown executor {name!r}: {name!r} is neither a configured environment nor an "
        f"executor name.{hint} Configured environments: {configured}. Executor names: "
        f"{', '.join(executors)}. Add an environment named {name!r} to your configuration "
        f"(wove_config.py or TOML, `[environments.{name}]`) or pass one of those names."
    )
