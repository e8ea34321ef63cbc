"""The old home of the worker runner, kept for one documented name.

docs/executors.md told users that a cancelled stdio task sees
``wove_adapters.callbacks.worker.TaskCancelled``; code that catches it by that path keeps
working. Everything else moved to ``wove_adapters.worker.runner``: import it from there.
"""

from __future__ import annotations

from wove_adapters.worker.runner import TaskCancelled

__all__ = ["TaskCancelled"]
