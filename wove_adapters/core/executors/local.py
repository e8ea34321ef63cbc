"""``local``: sync callables in a thread pool of ``max_workers``, coroutines on the loop.

For steps that must stay in the caller's process. A running sync callable cannot be
interrupted (Python has no safe thread kill), so cancelling one is not acknowledged and
``require_ack`` raises; queued work and coroutines cancel for real.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, Transport


class LocalTransport(Transport):
    name = "local"
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=False,
        confirm_cancel=True,
        requeue=False,
        heartbeats=True,
        inline_payload_limit=1 << 62,
    )

    def __init__(self) -> None:
        self._emit: Emit | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._thread_futures: dict[str, concurrent.futures.Future[Any]] = {}

    async def open(
        self,
        *,
        environment: str,
        executor_config: dict[str, Any],
        settings: dict[str, Any],
        emit: Emit,
    ) -> None:
        self._emit = emit
        workers = int(executor_config.get("max_workers") or settings.get("max_workers") or 32)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"wove-local-{environment}"
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

                def _call() -> Any:
                    loop.call_soon_threadsafe(started.set)
                    loop.call_soon_threadsafe(emit, frames.event(frames.TASK_STARTED, *ident))
                    return run.func(**run.args)

                submitted = self._pool.submit(_call)
                self._thread_futures[run.run_id] = submitted
                future = asyncio.wrap_future(submitted)
                if beat:
                    heart = loop.create_task(self._beat(run, beat, started))
                value = await future
                if inspect.isawaitable(value):
                    value = await value
            emit(frames.event(frames.TASK_RESULT, *ident, result=value))
        except asyncio.CancelledError:
            emit(frames.event(frames.TASK_CANCELLED, *ident, reason="cancelled"))
        except Exception as exc:
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
            self._emit(frames.event(frames.HEARTBEAT, run.run_id, run.task_id, run.attempt))

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

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
