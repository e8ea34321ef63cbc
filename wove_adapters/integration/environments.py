"""Turn an environment's resolved settings into a started, shared Dispatcher.

Dispatchers (and the transports, pools, receivers and clients under them) are shared per
process and per configuration: a second Hub, a second weave or a CLI call with the same
environment definition reuses the warm one. They live on the shared loop and stop at
interpreter exit.

``force_local`` (``WOVE__FORCE_LOCAL=1``) is applied here, once for every front end: each
environment then runs with the ``local`` executor in the calling process, whatever its
``executor`` and ``executor_config`` say, so no backend library is imported and nothing
connects to a broker (for tests). It says so once per process on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from typing import Any, Final

from wove_adapters import observability
from wove_adapters.adapters.base import BackendAdapter
from wove_adapters.adapters.registry import core_executor_class, get_adapter_class, transport_for
from wove_adapters.core import logs, signing
from wove_adapters.core.ledger import open_ledger
from wove_adapters.core.loop import PHASE_DISPATCHERS, add_shutdown_hook
from wove_adapters.core.protocol import EnvironmentExecutor
from wove_adapters.core.runtime import Dispatcher
from wove_adapters.core.transport import Transport
from wove_adapters.integration.executor_config import check_settings

log = logging.getLogger("wove_adapters.environments")
_dispatchers: dict[str, Dispatcher] = {}
_lock: asyncio.Lock | None = None
_process_key_id: str | None = None
_force_local_said = False
FORCE_LOCAL_NOTICE = (
    "wove-adapters: force_local is set (config key force_local / WOVE__FORCE_LOCAL): every "
    "environment runs with the local executor in this process; executor and "
    "executor_config are ignored"
)


def running_dispatchers() -> list[Dispatcher]:
    """Every dispatcher this process has started and not stopped (doctor, tests)."""
    return list(_dispatchers.values())


def effective_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as the dispatcher will run them: under ``force_local`` the ``local``
    executor with no ``executor_config`` (local refuses other executors' keys), the
    ledger and every policy unchanged."""
    global _force_local_said
    if not settings.get("force_local"):
        return settings
    if not _force_local_said:
        _force_local_said = True
        print(FORCE_LOCAL_NOTICE, file=sys.stderr, flush=True)
    return {**settings, "executor": "local", "executor_config": {}}


def build_transport(executor: Any) -> Transport:
    """Executor name or object -> transport. Unknown names raise ValueError here, at
    construction; a missing backend library raises MissingBackendError (naming the extra)."""
    if isinstance(executor, Transport):
        return executor
    if isinstance(executor, str):
        return transport_for(executor)
    if isinstance(executor, EnvironmentExecutor) or _looks_like_executor(executor):
        from wove_adapters.integration.foreign import ExecutorTransport

        return ExecutorTransport(executor)
    raise TypeError(
        f"Environment 'executor' must be an executor name or an EnvironmentExecutor "
        f"instance, not {type(executor).__name__}"
    )


def _looks_like_executor(obj: Any) -> bool:
    return all(callable(getattr(obj, name, None)) for name in ("start", "send", "recv", "stop"))


def key_id_for_config(executor_config: dict[str, Any]) -> str:
    """The signing key for this environment: its configured secret, else one generated
    key per process (published 0600 for same-host workers)."""
    global _process_key_id
    secret = signing.resolve_secret(executor_config.get("secret"))
    if secret is None:
        secret = signing.resolve_secret(os.environ.get(signing.SECRET_ENV))
    if secret is not None:
        return signing.KEYRING.add(secret)
    if _process_key_id is None:
        _process_key_id = signing.KEYRING.generate()
    return _process_key_id


def trusted_key_id(config: Any, environment: str | None) -> str:
    """The key a recorded run's outcome must be signed with, for a reader that did not
    submit it (``Hub.result``, ``wove-adapters result``): its environment's configured
    secret, else the process's ``WOVE_ADAPTERS_SECRET``, else any generated key of this
    user (``signing.ANY_GENERATED``). Nothing is generated or written to answer."""
    executor_config: dict[str, Any] = {}
    if config is not None and environment:
        with contextlib.suppress(Exception):
            settings = config.environment_settings(environment)
            executor_config = dict(settings.get("executor_config") or {})
    secret = signing.resolve_secret(executor_config.get("secret"))
    if secret is None:
        secret = signing.resolve_secret(os.environ.get(signing.SECRET_ENV))
    if secret is None:
        return signing.ANY_GENERATED
    return signing.KEYRING.add(secret)


# Adapters whose workers live in the submitting process (the ``process`` pool): only that
# process can stop them, like the core executors (local, stdio, the network clients).
_IN_PROCESS_ADAPTERS: Final = frozenset({"process"})


def remote_cancel_reason(settings: dict[str, Any]) -> tuple[str, str | None]:
    """The environment's executor name, and None when a process other than the submitting
    one can stop its jobs through the adapter (a Celery revoke, ``scancel``, a Kubernetes
    delete, ...), else why not. May import the adapter's module: call it in a thread."""
    settings = effective_settings(settings)
    executor = settings.get("executor", "local")
    if not isinstance(executor, str):
        return repr(executor), (
            "its executor is an object of the submitting process; only that process can "
            "stop its work")
    if executor in _IN_PROCESS_ADAPTERS or core_executor_class(executor) is not None:
        return executor, (
            f"its executor {executor!r} keeps its workers in the submitting process (or, "
            f"for a network executor, behind it): only that process can stop them")
    try:
        get_adapter_class(executor, require_backend=False)
    except ValueError as exc:
        return executor, str(exc)
    return executor, None


async def open_backend_adapter(environment: str, settings: dict[str, Any]) -> BackendAdapter:
    """The environment's backend adapter, started from its checked ``executor_config`` and
    signing key as ``AdapterTransport.start`` starts it, but with no receiver, ledger or
    dispatcher: for a process that acts on jobs others submitted (the runs page cancels
    them). The caller closes it (``aclose``)."""

    def prepare() -> tuple[type[BackendAdapter], dict[str, Any]]:
        # In a thread: imports the backend library, may read a key file.
        checked = effective_settings(settings)
        check_settings(environment, checked)
        cls = get_adapter_class(str(checked.get("executor")))
        executor_config = dict(checked.get("executor_config") or {})
        executor_config["_key_id"] = key_id_for_config(executor_config)
        return cls, executor_config

    cls, executor_config = await asyncio.to_thread(prepare)
    adapter = cls(executor_config, environment=environment)
    await adapter.start()
    return adapter


def _identity(environment: str, settings: dict[str, Any]) -> str:
    executor = settings.get("executor", "local")
    executor_id = executor if isinstance(executor, str) else f"obj:{id(executor)}"
    return json.dumps(
        [
            environment,
            executor_id,
            settings.get("executor_config") or {},
            settings.get("ledger"),
            settings.get("max_workers"),
        ],
        sort_keys=True,
        default=repr,
    )


async def get_dispatcher(environment: str, settings: dict[str, Any]) -> Dispatcher:
    """The shared, started dispatcher for these settings (runs on the shared loop)."""
    global _lock
    logs.apply_settings(settings)
    observability.apply_settings(settings)  # tracing / metrics, once per value
    settings = effective_settings(settings)
    ident = _identity(environment, settings)
    found = _dispatchers.get(ident)
    if found is not None:
        return found
    if _lock is None:
        _lock = asyncio.Lock()
    async with _lock:
        found = _dispatchers.get(ident)
        if found is not None:
            return found
        # A misspelt executor_config key fails here, before the backend library is
        # imported, a receiver binds or anything connects.
        check_settings(environment, settings)
        transport = build_transport(settings.get("executor", "local"))
        executor_config = dict(settings.get("executor_config") or {})
        ledger = open_ledger(settings.get("ledger"))
        key_id = key_id_for_config(executor_config)
        executor_config["_key_id"] = key_id
        executor_config["_ledger_url"] = ledger.url if ledger.shareable else None
        executor_config.setdefault(
            "reconcile_seconds", getattr(transport, "reconcile_seconds", 2.0)
        )
        dispatcher = Dispatcher(
            environment=environment,
            transport=transport,
            executor_config=executor_config,
            settings=settings,
            ledger=ledger,
            key_id=key_id,
        )
        from wove_adapters.core.policies import DeliveryPolicy

        await dispatcher.start()
        # Reject impossible environment-level policies at start-up, before any run.
        try:
            dispatcher.check_policy(
                DeliveryPolicy.from_settings(settings, where=f"Environment '{environment}'")
            )
        except Exception:
            await dispatcher.stop()
            raise
        _dispatchers[ident] = dispatcher
        if len(_dispatchers) == 1:
            add_shutdown_hook(stop_all, PHASE_DISPATCHERS)
        return dispatcher


async def stop_all() -> None:
    """Stop every shared dispatcher (at exit, after the callers' own close)."""
    dispatchers = list(_dispatchers.values())
    _dispatchers.clear()
    for dispatcher in dispatchers:
        try:
            await dispatcher.stop()
        except Exception as exc:  # the others must still stop and flush
            log.warning("stopping environment %r failed: %r", dispatcher.environment, exc)
