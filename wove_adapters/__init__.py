"""wove-adapters: hand Python tasks to the job systems you already run, get results back.

Start with ``Hub`` (``with Hub() as hub: hub.run(fn, x, environment="reports")``), or
plug our executors into a wove weave with ``wove_adapters.integration.wove.executor``.

Names are imported on first use (PEP 562): a worker process runs
``python -m wove_adapters.worker`` and must not pay for the Hub, aiohttp and the
configuration machinery it never touches (measured: ~90 ms of a ~100 ms worker start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "BackendUnavailableError": "wove_adapters.core.errors",
    "CancelNotAcknowledgedError": "wove_adapters.core.errors",
    "Capabilities": "wove_adapters.core.policies",
    "DeliveryDetachedError": "wove_adapters.core.errors",
    "DeliveryOrphanedError": "wove_adapters.core.errors",
    "DeliveryPolicy": "wove_adapters.core.policies",
    "DeliveryTimeoutError": "wove_adapters.core.errors",
    "EnvironmentExecutor": "wove_adapters.core.protocol",
    "ExecutorConfigError": "wove_adapters.core.errors",
    "Hub": "wove_adapters.integration.hub",
    "HubExecutor": "wove_adapters.integration.hub",
    "JobState": "wove_adapters.core.policies",
    "MissingBackendError": "wove_adapters.core.errors",
    "MissingDispatchFeatureError": "wove_adapters.core.errors",
    "PayloadError": "wove_adapters.core.errors",
    "RunFuture": "wove_adapters.integration.hub",
    "RunState": "wove_adapters.core.policies",
    "TaskExecutionError": "wove_adapters.core.errors",
    "UnsupportedPolicyError": "wove_adapters.core.errors",
    "WoveAdaptersError": "wove_adapters.core.errors",
}

__all__ = [
    "BackendUnavailableError",
    "CancelNotAcknowledgedError",
    "Capabilities",
    "DeliveryDetachedError",
    "DeliveryOrphanedError",
    "DeliveryPolicy",
    "DeliveryTimeoutError",
    "EnvironmentExecutor",
    "ExecutorConfigError",
    "Hub",
    "HubExecutor",
    "JobState",
    "MissingBackendError",
    "MissingDispatchFeatureError",
    "PayloadError",
    "RunFuture",
    "RunState",
    "TaskExecutionError",
    "UnsupportedPolicyError",
    "WoveAdaptersError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wove_adapters' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from wove_adapters.core.errors import (
        BackendUnavailableError,
        CancelNotAcknowledgedError,
        DeliveryDetachedError,
        DeliveryOrphanedError,
        DeliveryTimeoutError,
        ExecutorConfigError,
        MissingBackendError,
        MissingDispatchFeatureError,
        PayloadError,
        TaskExecutionError,
        UnsupportedPolicyError,
        WoveAdaptersError,
    )
    from wove_adapters.core.policies import Capabilities, DeliveryPolicy, JobState, RunState
    from wove_adapters.core.protocol import EnvironmentExecutor
    from wove_adapters.integration.hub import Hub, HubExecutor, RunFuture
