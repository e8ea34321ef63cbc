"""``process``: every task is its own ``python -m wove_adapters.worker`` OS process.

The reference adapter and the embedded default: no server, yet it uses the whole return
path (signed payload in a file, store for large bodies, signed callbacks to the receiver,
the ledger for detached runs). Processes start in their own session, so a detached run
outlives its caller. Cancel is SIGTERM: the worker reports ``task_cancelled`` (a task that
ignores it is not confirmed, and ``require_ack`` raises). A configured
``executor_config.secret`` is handed to the worker processes as ``WOVE_ADAPTERS_SECRET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core.paths import data_dir
from wove_adapters.core.policies import Capabilities, JobState


class ProcessAdapter(BackendAdapter):
    name = "process"
    extra = ""
    required_modules = ()
    capabilities = Capabilities(
        cancel_queued=True,
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=False,
        native_result=False,
        status=True,
        requeue=True,
        detach=True,
        inline_payload_limit=64 * 1024,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = {}
    reconcile_seconds: ClassVar[float] = 0.5

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._files: dict[str, Path] = {}
        self._spool = Path(config.get("spool_dir") or data_dir() / "spool")
        self._spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._python = str(config.get("python") or sys.executable)
        self._env = {k: str(v) for k, v in (config.get("env") or {}).items()}
        if config.get("secret"):
            from wove_adapters.callbacks.signing import SECRET_ENV, resolve_secret

            secret = resolve_secret(config["secret"])
            if secret is not None:
                self._env.setdefault(SECRET_ENV, secret.decode())

    async def submit(self, job: JobSpec) -> str:
        path = self._spool / f"{job.job_name}.payload"
        await asyncio.to_thread(_write_private, path, job.payload)
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "wove_adapters.worker",
            "--payload-file",
            str(path),
            env={**os.environ, **self._env},
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        handle = str(proc.pid)
        self._procs[handle] = proc
        self._files[handle] = path
        return handle

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        proc = self._procs.get(handle)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)

    async def status(self, handle: str) -> JobState:
        proc = self._procs.get(handle)
        if proc is None:
            return JobState.GONE
        code = proc.returncode
        if code is None:
            return JobState.RUNNING
        self._cleanup(handle)
        if code == 0:
            return JobState.SUCCEEDED
        if code in (143, -signal.SIGTERM):
            return JobState.CANCELLED
        return JobState.FAILED

    async def detach(self, handle: str) -> None:
        self._procs.pop(handle, None)
        self._files.pop(handle, None)

    async def release(self, handle: str) -> None:
        """The run ended: drop the payload file and the process handle."""
        self._procs.pop(handle, None)
        self._cleanup(handle)

    def _cleanup(self, handle: str) -> None:
        path = self._files.pop(handle, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def close(self) -> None:
        for proc in list(self._procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for handle, proc in list(self._procs.items()):
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._cleanup(handle)
        self._procs.clear()


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
