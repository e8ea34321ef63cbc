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
import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core.options import ExecutorOptions, check_executor_config
from wove_adapters.core.policies import Capabilities, DeliveryPolicy, JobState

Emit = Callable[[dict[str, Any]], None]
log = logging.getLogger("wove_adapters.transport")
# How many status() calls the default status_many runs at once.
STATUS_CONCURRENCY = 16


@dataclass(frozen=True)
class StartContext:
    """What a transport is started with. One object rather than keyword arguments, so that
    a new piece of context reaches every transport (ours and third parties') without each
    one restating its signature."""

    environment: str
    executor_config: dict[str, Any]
    settings: dict[str, Any]
    emit: Emit

    def check_options(self, struct: type[ExecutorOptions] | None, executor: str) -> None:
        """Refuse an unknown or mistyped ``executor_config`` key before anything binds or
        is contacted, naming this environment and ``executor``."""
        check_executor_config(
            struct, self.executor_config, environment=self.environment, executor=executor
        )


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

    def task_frame(self) -> dict[str, Any]:
        """wove's ``run_task`` frame for this attempt, for executors that speak wove's
        frames (a wove executor object, a network service). ``delivery`` carries the
        idempotency key, so a service can attach a second request with it to the first,
        and, when the run is traced, the attempt's W3C ``traceparent``/``tracestate``
        (``wove-adapters serve`` starts the task's span from them; others ignore them)."""
        delivery = self.policy.as_delivery(self.idempotency_key)
        trace = self.extra.get("trace")
        if trace:
            delivery = {**delivery, **trace}
        return {
            "type": frames.RUN_TASK,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "callable": self.func,
            "args": self.args,
            "delivery": delivery,
        }


class Transport(abc.ABC):
    name: str = "transport"
    capabilities: Capabilities = Capabilities()
    # Whether ``submit_chunk`` packs runs into one backend message (set by ``start``):
    # ``Hub.map`` chunks a mapped call only then.
    supports_chunks: bool = False

    @abc.abstractmethod
    async def start(self, context: StartContext) -> None:
        """Acquire shared resources (pools, receivers, clients). Called once."""

    @abc.abstractmethod
    async def submit(self, run: RunAttempt) -> None:
        """Hand one attempt to the backend; return once it is accepted."""

    async def submit_chunk(self, runs: Sequence[RunAttempt]) -> None:
        """Hand several first attempts of one mapped call to the backend as one message
        (``supports_chunks``); each run keeps its own events, cancel and orphan policy.
        Default: ``submit`` each."""
        for run in runs:
            await self.submit(run)

    @abc.abstractmethod
    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        """Ask the backend to stop the attempt. A confirmed stop arrives as a
        ``task_cancelled`` event; raising means the request itself failed."""

    async def status(self, run: RunAttempt) -> JobState:
        """The backend's view of the attempt, for reconciliation."""
        return JobState.UNKNOWN

    async def status_many(self, runs: Sequence[RunAttempt]) -> dict[str, JobState]:
        """The backend's view of several attempts, by run id: the dispatcher asks once per
        reconciliation tick for every run it wonders about, so a backend that can answer
        for many jobs in one request (a pipeline, a LIST, DescribeJobs) is asked once.
        A run missing from the answer could not be told this time; that is never a
        verdict. Default: ``status`` of each, at most ``STATUS_CONCURRENCY`` at a time."""
        return await gather_statuses(self.status, {run.run_id: run for run in runs})

    async def waiting_reasons(self, runs: Sequence[RunAttempt]) -> dict[str, str]:
        """Why the backend has not started some attempts, in its own words (a scheduler's
        pending reason, a held job), by run id. Asked only for the "has not started"
        warning and the lost-run message, so an operator reads the cause there instead of
        on the backend's console; never a verdict. Default: nothing to add."""
        return {}

    async def detach(self, run: RunAttempt) -> None:
        """Stop tracking the attempt but leave it running (``detach`` policy)."""

    async def release(self, run: RunAttempt) -> None:
        """The run ended: drop per-run state (payload files, registrations)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release what ``start`` acquired."""


async def gather_statuses(
    status: Callable[[Any], Any], items: dict[str, Any]
) -> dict[str, JobState]:
    """``{name: await status(item)}`` for every item, a bounded number at a time. An item
    whose status failed is left out; when every one failed, the first error is raised
    (the backend itself is unreachable: the caller says so)."""
    bound = asyncio.Semaphore(STATUS_CONCURRENCY)

    async def one(item: Any) -> JobState:
        async with bound:
            state: JobState = await status(item)
            return state

    names = list(items)
    answers = await asyncio.gather(*(one(items[n]) for n in names), return_exceptions=True)
    states: dict[str, JobState] = {}
    errors: list[BaseException] = []
    for name, answer in zip(names, answers, strict=True):
        if isinstance(answer, BaseException):
            log.debug("status of %s failed: %r", name, answer)
            errors.append(answer)
        else:
            states[name] = answer
    if errors and not states:
        raise errors[0]
    return states
