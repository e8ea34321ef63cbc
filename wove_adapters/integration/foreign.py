"""Any ``EnvironmentExecutor`` (ours, wove's own, a user's) as a transport.

Such an executor speaks frames only, so the dispatcher cannot tell attempts apart or ask
for status: requeue and reconciliation are off, the rest of the policies apply.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, StartContext, Transport


class ExecutorTransport(Transport):
    capabilities = Capabilities(
        cancel_queued=True, cancel_running=True, confirm_cancel=True, requeue=False
    )

    def __init__(self, executor: Any) -> None:
        self.executor = executor
        self.name = type(executor).__name__
        self._reader: asyncio.Task[None] | None = None
        self._emit: Emit | None = None

    async def start(self, context: StartContext) -> None:
        self._emit = context.emit
        config = {k: v for k, v in context.executor_config.items() if not k.startswith("_")}
        await self.executor.start(
            environment_name=context.environment,
            environment_config=config,
            run_config=context.settings,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self._emit is not None
        while True:
            frame = await self.executor.recv()
            if isinstance(frame, dict) and frame.get("type") in frames.EVENT_TYPES:
                frame.setdefault("attempt", 1)
                self._emit(frame)

    async def submit(self, run: RunAttempt) -> None:
        await self.executor.send(run.task_frame())

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        await self.executor.send(
            {
                "type": frames.CANCEL_TASK,
                "run_id": run.run_id,
                "task_id": run.task_id,
                "delivery_cancel_mode": mode,
                "delivery_orphan_policy": run.policy.orphan_policy,
            }
        )

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        with contextlib.suppress(Exception):
            await self.executor.send({"type": frames.SHUTDOWN})
        await self.executor.stop()
