"""The thin contract under the dispatcher: put one attempt of a run somewhere, ask it to
stop, say how it is doing. Local threads, stdio worker processes and every backend adapter
fill it; the dispatcher (``runtime.py``) owns all policy.

A transport reports through ``emit(frame)`` with dict event frames (``task_started``,
``heartbeat``, ``log``, terminal events, and ``task_lost`` when it knows a run died
without a terminal event). Events carry ``run_id`` and ``attempt``; the dispatcher drops
events of superseded attempts.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wove_adapters.core.policies import Capabilities, DeliveryPolicy, JobState

Emit = Callable[[dict[str, Any]], None]


@dataclass
class RunAttempt:
    run_id: str
    task_id: str
    func: Any
    args: dict[str, Any]
    policy: DeliveryPolicy
    attempt: int = 1
    idempotency_key: str | None = None
    environment: str = "default"
    submission: str | None = None  # the backend's handle, set by the transport
    extra: dict[str, Any] = field(default_factory=dict)


class Transport(abc.ABC):
    name: str = "transport"
    capabilities: Capabilities = Capabilities()

    @abc.abstractmethod
    async def open(
        self,
        *,
        environment: str,
        executor_config: dict[str, Any],
        settings: dict[str, Any],
        emit: Emit,
    ) -> None:
        """Acquire shared resources (pools, receivers, clients). Called once."""

    @abc.abstractmethod
    async def submit(self, run: RunAttempt) -> None:
        """Hand one attempt to the backend; return once it is accepted."""

    @abc.abstractmethod
    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        """Ask the backend to stop the attempt. A confirmed stop arrives as a
        ``task_cancelled`` event; raising means the request itself failed."""

    async def status(self, run: RunAttempt) -> JobState:
        """The backend's view of the attempt, for reconciliation."""
        return JobState.UNKNOWN

    async def detach(self, run: RunAttempt) -> None:
        """Stop tracking the attempt but leave it running (``detach`` policy)."""

    async def release(self, run: RunAttempt) -> None:
        """The run ended: drop per-run state (payload files, registrations)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release what ``open`` acquired."""
