"""The executor contract: start / send / recv / stop, frames in and events out.

It is wove 2.x's ``EnvironmentExecutor`` contract, method for method, so that anything
implementing it can be handed to a wove environment through ``integration.wove``:

- ``start`` prepares the executor for one environment; it may be called on an instance
  that a previous session stopped, and must then be cheap (shared resources stay warm).
- ``send`` accepts one command frame (``run_task``, ``cancel_task``, ``shutdown``) and
  returns once the command is accepted, never when the task finishes.
- ``recv`` returns the next event frame; many runs' events interleave. Each run ends with
  exactly one terminal event (``task_result``, ``task_error``, ``task_cancelled``).
- ``stop`` releases what ``start`` took; runs still in flight get their orphan policy.
"""

from __future__ import annotations

import abc
from typing import Any


class EnvironmentExecutor(abc.ABC):
    """Frames in, events out. See the module docstring for each method's promise."""

    @abc.abstractmethod
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: dict[str, Any],
        run_config: dict[str, Any],
    ) -> None:
        """Prepare to run tasks for ``environment_name`` (``environment_config`` is its
        ``executor_config``; ``run_config`` the resolved environment settings)."""

    @abc.abstractmethod
    async def send(self, frame: dict[str, Any]) -> None:
        """Accept one command frame."""

    @abc.abstractmethod
    async def recv(self) -> dict[str, Any]:
        """The next event frame."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release the session's resources."""
