"""Check an environment's ``executor_config`` against its executor's declared keys.

One check for every entry point: an environment starting (``get_dispatcher``), ``wove-
adapters config`` and ``wove-adapters doctor``. It runs before the executor is built, so a
misspelt key is reported even where the backend library is not installed (adapter modules
import their library lazily; the declaration sits at the top of each module).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.options import ExecutorOptions, check_executor_config
from wove_adapters.core.transport import Transport


def config_struct_for(executor: Any) -> type[ExecutorOptions] | None:
    """The declared ``executor_config`` of an executor name or transport; None when it
    declares none (an ``EnvironmentExecutor`` object reads its own configuration, a
    third-party adapter may declare nothing, or its module cannot be imported here).
    Unknown names raise ValueError, as building the executor would."""
    if isinstance(executor, str):
        from wove_adapters.adapters.registry import core_executor_class, get_adapter_class

        core = core_executor_class(executor)  # local, stdio, http, https, grpc, websocket
        if core is not None:
            struct = getattr(core, "config_struct", None)
            return struct if isinstance(struct, type) else None

        try:
            return get_adapter_class(executor, require_backend=False).config_struct
        except MissingBackendError:  # a module importing its library eagerly
            return None
    if isinstance(executor, Transport):
        adapter_cls = getattr(executor, "adapter_cls", None)
        struct = getattr(adapter_cls or executor, "config_struct", None)
        return struct if isinstance(struct, type) else None
    return None


def executor_label(executor: Any) -> str:
    if isinstance(executor, str):
        return executor
    return str(getattr(executor, "name", "") or type(executor).__name__)


def check_settings(environment: str, settings: Mapping[str, Any]) -> None:
    """Raise ``ExecutorConfigError`` if the settings' ``executor_config`` has a key its
    executor does not declare, or a value of the wrong type."""
    executor = settings.get("executor") or "local"
    check_executor_config(
        config_struct_for(executor),
        settings.get("executor_config") or {},
        environment=environment,
        executor=executor_label(executor),
    )
