"""``local``: sync callables in a thread pool of ``max_workers``, coroutines on the loop.

For steps that must stay in the caller's process. A running sync callable cannot be
interrupted (Python has no safe thread kill), so this executor cannot confirm a cancel and
declares ``confirm_cancel=False``: ``require_ack`` is refused when the environment starts.
Queued work and coroutines cancel for real.

Every outcome of the task is reported as its outcome, ``BaseException`` included: a task
that raises ``SystemExit`` or ``KeyboardInterrupt`` fails its own run, as in
``ThreadPoolExecutor``. Let through, either would stop the shared event loop and strand
every other run of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core.options import ExecutorOptions
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, StartContext, Transport

# A run that ends within this many seconds gets no heartbeat machinery (the workers'
# short-task window, ``worker.runner.STARTED_AFTER``: heartbeat timeouts are seconds).
STARTED_AFTER = 0.05


class LocalOptions(ExecutorOptions, kw_only=True):
    """``executor_config`` of ``local`` (see docs/executors.md)."""

    # Threads for sync tasks; unset: the ``max_workers`` setting, else 32.
    max_workers: int | None = None


class LocalTransport(Transport):
    name = "local"
    config_struct = LocalOptions
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=False,
        confirm_cancel=False,
        requeue=False,
        heartbeats=True,
        inline_payload_limit=1 << 62,
    )

    def __init__(self) -> None:
        self._emit: Emit | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._thread_futures: dict[str, concurrent.futures.Future[Any]] = {}

    async def start(self, context: StartContext) -> None:
        context.check_options(LocalOptions, self.name)
        self._emit = context.emit
        workers = _pool_size(context.environment, context.executor_config, context.settings)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"wove-local-{context.environment}"
        )

    async def submit(self, run: RunAttempt) -> None:
        self._tasks[run.run_id] = asyncio.get_running_loop().create_task(self._execute(run))

    async def _execute(self, run: RunAttempt) -> None:
        assert self._emit is not None and self._pool is not None
        emit = self._emit
        ident = (run.run_id, run.task_id, run.attempt)
        beat = run.policy.heartbeat_seconds
        heart: asyncio.Task[None] | None = None
        try:
            if inspect.iscoroutinefunction(run.func):
                emit(frames.event(frames.TASK_STARTED, *ident))
                if beat:
                    heart = asyncio.get_running_loop().create_task(self._beat(run, beat))
                value = await run.func(**run.args)
            else:
                loop = asyncio.get_running_loop()
                started = asyncio.Event()

                def _started() -> None:
                    started.set()
                    emit(frames.event(frames.TASK_STARTED, *ident))

                def _call() -> Any:
                    loop.call_soon_threadsafe(_started)  # one wake-up of the loop, not two
                    return run.func(**run.args)

                submitted = self._pool.submit(_call)
                self._thread_futures[run.run_id] = submitted
                future = asyncio.wrap_future(submitted)
                pulse: asyncio.TimerHandle | None = None
                if beat:
                    # Beats only for a run that outlives the short-task window (most end
                    # first): no task, event wait and timer per short run.
                    def _pulse() -> None:
                        nonlocal heart
                        if not future.done():
                            heart = loop.create_task(self._beat(run, beat, started))

                    pulse = loop.call_later(STARTED_AFTER, _pulse)
                try:
                    value = await future
                finally:
                    if pulse is not None:
                        pulse.cancel()
                if inspect.isawaitable(value):
                    value = await value
            emit(frames.event(frames.TASK_RESULT, *ident, result=value))
        except asyncio.CancelledError:
            emit(frames.event(frames.TASK_CANCELLED, *ident, reason="cancelled"))
        except BaseException as exc:  # SystemExit too: it is this run's outcome, see above
            emit(frames.error_event(run.run_id, run.task_id, exc, attempt=run.attempt))
        finally:
            if heart is not None:
                heart.cancel()
            self._tasks.pop(run.run_id, None)
            self._thread_futures.pop(run.run_id, None)

    async def _beat(
        self, run: RunAttempt, every: float, started: asyncio.Event | None = None
    ) -> None:
        assert self._emit is not None
        if started is not None:
            await started.wait()
        while True:
            await asyncio.sleep(max(every / 3, 0.01))
            self._emit(frames.event_of(run, frames.HEARTBEAT))

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        thread_future = self._thread_futures.get(run.run_id)
        if thread_future is not None:
            # Succeeds only if no thread has picked it up yet (then the run reports
            # task_cancelled); a running thread finishes on its own and nothing is
            # acknowledged, so require_ack raises CancelNotAcknowledgedError.
            thread_future.cancel()
            return
        task = self._tasks.get(run.run_id)
        if task is not None:
            task.cancel()

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _pool_size(environment: str, executor_config: dict[str, Any], settings: dict[str, Any]) -> int:
    """``executor_config.max_workers``, else the ``max_workers`` setting, else 32; a size
    below 1 is refused (a pool of none would accept runs and never start them)."""
    for where, source in (
        ("executor_config.max_workers", executor_config),
        ("max_workers", settings),
    ):
        value = source.get("max_workers")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"Environment '{environment}': {where} must be greater than 0 (got {value!r}); "
                "it is the number of threads that run this environment's sync tasks"
            )
        return value
    return 32
