"""One module per job system. Each imports its library lazily, inside methods."""

from wove_adapters.adapters.base import (
    BackendAdapter,
    JobSpec,
    adapter_names,
    get_adapter_class,
    register_adapter,
)

__all__ = ["BackendAdapter", "JobSpec", "adapter_names", "get_adapter_class", "register_adapter"]
