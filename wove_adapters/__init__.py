"""wove-adapters: hand Python tasks to the job systems you already run, get results back.

Start with ``Hub`` (``with Hub() as hub: hub.run(fn, x, environment="reports")``), or
plug our executors into a wove weave with ``wove_adapters.integration.wove.executor``.
"""

from wove_adapters.core.errors import (
    CancelNotAcknowledgedError,
    DeliveryDetachedError,
    DeliveryOrphanedError,
    DeliveryTimeoutError,
    MissingBackendError,
    MissingDispatchFeatureError,
    PayloadError,
    TaskExecutionError,
    UnsupportedPolicyError,
    WoveAdaptersError,
)
from wove_adapters.core.policies import Capabilities, DeliveryPolicy, JobState
from wove_adapters.core.protocol import EnvironmentExecutor
from wove_adapters.integration.hub import Hub, HubExecutor, RunFuture

__all__ = [
    "CancelNotAcknowledgedError",
    "Capabilities",
    "DeliveryDetachedError",
    "DeliveryOrphanedError",
    "DeliveryPolicy",
    "DeliveryTimeoutError",
    "EnvironmentExecutor",
    "Hub",
    "HubExecutor",
    "JobState",
    "MissingBackendError",
    "MissingDispatchFeatureError",
    "PayloadError",
    "RunFuture",
    "TaskExecutionError",
    "UnsupportedPolicyError",
    "WoveAdaptersError",
]
