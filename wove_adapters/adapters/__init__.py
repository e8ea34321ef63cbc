"""One module per job system. Each imports its library lazily, inside methods."""

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.adapters.registry import (
    EXECUTORS,
    adapter_names,
    executor_names,
    get_adapter_class,
    register_adapter,
)

__all__ = [
    "EXECUTORS",
    "BackendAdapter",
    "JobSpec",
    "adapter_names",
    "executor_names",
    "get_adapter_class",
    "register_adapter",
]
