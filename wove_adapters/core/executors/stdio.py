"""``stdio``: a pool of ``python -m wove_adapters.stdio_worker`` processes over pipes.

Each process runs one task at a time, so cancellation interrupts real work and a
worker killed mid-task is noticed at once (its stdout closes): the run is reported lost
and the dispatcher applies the orphan policy; the pool replaces the process.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
from typing import Any

import msgspec

from wove_adapters.callbacks.payload import dumps
from wove_adapters.core import frames
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, Transport

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(frames.WireEvent)


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.run: RunAttempt | None = None
        self.reader: asyncio.Task[None] | None = None

    async def send(self, command: frames.WireCommand) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_encoder.encode(command) + b"\n")
        await self.proc.stdin.drain()


class StdioTransport(Transport):
    name = "stdio"
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=True,
        confirm_cancel=True,
        requeue=True,
        heartbeats=True,
        inline_payload_limit=1 << 62,
    )

    def __init__(self) -> None:
        self._emit: Emit | None = None
        self._workers: list[_Worker] = []
        self._pending: collections.deque[RunAttempt] = collections.deque()
        self._closing = False
        self._command: list[str] = []
        self._env: dict[str, str] = {}
        self._size = 1

    async def open(
        self,
        *,
        environment: str,
        executor_config: dict[str, Any],
        settings: dict[str, Any],
        emit: Emit,
    ) -> None:
        self._emit = emit
        self._size = int(executor_config.get("processes") or min(os.cpu_count() or 2, 8))
        python = str(executor_config.get("python") or sys.executable)
        self._command = [python, "-m", "wove_adapters.stdio_worker"]
        self._env = {
            **os.environ,
            **{k: str(v) for k, v in (executor_config.get("env") or {}).items()},
        }
        await asyncio.gather(*(self._spawn() for _ in range(self._size)))

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            *self._command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._env,
            limit=1 << 30,
        )
        worker = _Worker(proc)
        worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
        self._workers.append(worker)
        return worker

    @property
    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers]

    async def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None and self._emit is not None
        from wove_adapters.core.runtime import wire_to_frame

        while True:
            line = await worker.proc.stdout.readline()
            if not line:
                break
            try:
                event = _event_decoder.decode(line)
                frame = wire_to_frame(event)
            except Exception as exc:
                print(f"stdio executor: bad event line ignored: {exc}", file=sys.stderr)
                continue
            if frame["type"] in frames.TERMINAL_EVENTS and worker.run is not None:
                if worker.run.run_id == frame["run_id"]:
                    worker.run = None
            self._emit(frame)
            if worker.run is None:
                await self._dispatch()
        code = await worker.proc.wait()
        lost = worker.run
        worker.run = None
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        if lost is not None:
            self._emit(
                frames.event(
                    frames.TASK_LOST,
                    lost.run_id,
                    lost.task_id,
                    lost.attempt,
                    reason=f"stdio worker pid {worker.proc.pid} exited with code {code}",
                )
            )
        if not self._closing:
            await self._spawn()
            await self._dispatch()

    async def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._pending:
                return
            if worker.run is None and worker.proc.returncode is None:
                run = self._pending.popleft()
                worker.run = run
                try:
                    await worker.send(
                        frames.RunTaskWire(
                            run_id=run.run_id,
                            task_id=run.task_id,
                            attempt=run.attempt,
                            body=run.extra["body"],
                            heartbeat_seconds=run.policy.heartbeat_seconds,
                        )
                    )
                except (ConnectionError, RuntimeError):
                    # The worker is dying; its reader reports the run lost.
                    pass

    async def submit(self, run: RunAttempt) -> None:
        if "body" not in run.extra:
            run.extra["body"] = dumps((run.func, run.args))
        self._pending.append(run)
        await self._dispatch()

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        for queued in list(self._pending):
            if queued.run_id == run.run_id and queued.attempt == run.attempt:
                self._pending.remove(queued)
                assert self._emit is not None
                self._emit(
                    frames.event(
                        frames.TASK_CANCELLED,
                        run.run_id,
                        run.task_id,
                        run.attempt,
                        reason="removed from the queue",
                    )
                )
                return
        for worker in self._workers:
            if worker.run is not None and worker.run.run_id == run.run_id:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await worker.send(frames.CancelTaskWire(run_id=run.run_id))
                return

    async def close(self) -> None:
        self._closing = True
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                await worker.send(frames.ShutdownWire())
                assert worker.proc.stdin is not None
                worker.proc.stdin.close()
        for worker in list(self._workers):
            try:
                await asyncio.wait_for(worker.proc.wait(), 3)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
