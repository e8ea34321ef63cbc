"""``process``: every task is its own ``python -m wove_adapters.worker`` OS process.

The reference adapter and the embedded default: no server, yet it uses the whole return
path (signed payload in a file, store for large bodies, signed callbacks to the receiver,
the ledger for detached runs). Processes start in their own session, so a detached run
outlives its caller. Cancel is SIGTERM: the worker reports ``task_cancelled`` (a task that
ignores it is not confirmed, and ``require_ack`` raises). A configured
``executor_config.secret`` is handed to the worker processes as ``WOVE_ADAPTERS_SECRET``.

Each worker process is watched: one that dies without settling its outcome is reported at
once, with its exit code and signal, instead of waiting for reconciliation. A fault signal
(SIGSEGV, SIGABRT, ...) or an exit code the worker never uses means the task ended its own
process: the run fails with ``WorkerCrashed``. Any other signal (SIGKILL) means it was
ended from outside: the run is lost and its orphan policy applies. The worker's own exit
codes (0 succeeded, 1 failed, 143 cancelled) say its outcome was delivered or recorded, so
nothing is reported for them; 2 says it refused the payload (it signs and sends nothing for
a payload that does not verify): the run fails with PayloadError; 3 says it is lost.
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
from wove_adapters.callbacks.inbox import refusal_frame
from wove_adapters.core import frames
from wove_adapters.core.aio import wait_within
from wove_adapters.core.executors.stdio import FAULT_SIGNALS, describe_exit, exit_frame
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.paths import data_dir
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.stores import write_private
from wove_adapters.worker.runner import (
    EXIT_CANCELLED,
    EXIT_DELIVERY_FAILED,
    EXIT_OK,
    EXIT_PAYLOAD_REFUSED,
    EXIT_TASK_FAILED,
    worker_command,
)

# ``python -m wove_adapters.worker`` exit codes after which its outcome is settled
# (delivered, or owned by the ledger); a refused payload (EXIT_PAYLOAD_REFUSED) is
# reported only by its code.
_SETTLED_CODES = frozenset({EXIT_OK, EXIT_TASK_FAILED, EXIT_CANCELLED})


class ProcessOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``process`` (docs/adapters/process.md)."""

    spool_dir: str | None = None  # default: <data dir>/spool
    python: str | None = None  # default: the caller's sys.executable
    env: dict[str, Any] = {}


class ProcessAdapter(BackendAdapter):
    name = "process"
    config_struct = ProcessOptions
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=False,
        inline_payload_limit=64 * 1024,
    )
    reconcile_seconds: ClassVar[float] = 0.5
    # The worker process ends with its task, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "flushed"

    options: ProcessOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._files: dict[str, Path] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._spool = Path(self.options.spool_dir or data_dir() / "spool")
        self._spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._python = self.options.python or sys.executable
        self._env = {k: str(v) for k, v in self.options.env.items()}
        if self.options.secret:
            from wove_adapters.core.signing import SECRET_ENV, resolve_secret

            secret = resolve_secret(self.options.secret)
            if secret is not None:
                self._env.setdefault(SECRET_ENV, secret.decode())

    async def submit(self, job: JobSpec) -> str:
        path = self._spool / f"{job.job_name}.payload"
        await asyncio.to_thread(write_private, path, job.payload)
        proc = await asyncio.create_subprocess_exec(
            *worker_command(self._python, "--payload-file", str(path)),
            env={**os.environ, **self._env},
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        handle = str(proc.pid)
        self._procs[handle] = proc
        self._files[handle] = path
        watcher = asyncio.get_running_loop().create_task(self._watch(handle, proc, job))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return handle

    async def _watch(self, handle: str, proc: asyncio.subprocess.Process, job: JobSpec) -> None:
        """Report a worker that died without settling its outcome (see the module doc)."""
        code = await proc.wait()
        if self._closing or self._procs.get(handle) is not proc or self.emit is None:
            return  # the run ended (released) or was detached: nothing to report
        if code in _SETTLED_CODES:
            return
        worker = f"process worker pid {proc.pid}"
        if code == EXIT_PAYLOAD_REFUSED:
            self.emit(refusal_frame(self.name, job, self.config))
            return
        if code == EXIT_DELIVERY_FAILED:
            self.emit(frames.event_of(job, frames.TASK_LOST, reason=(
                f"{worker} {describe_exit(code)}: it could neither deliver nor record the "
                f"outcome of task '{job.task_id}'")))
            return
        by_task = code >= 0 or -code in FAULT_SIGNALS
        self.emit(exit_frame(worker, code, job.run_id, job.task_id, job.attempt, by_task=by_task))

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
        if code == EXIT_OK:
            return JobState.SUCCEEDED
        if code in (EXIT_CANCELLED, -signal.SIGTERM):
            return JobState.CANCELLED
        if code == EXIT_PAYLOAD_REFUSED:
            return JobState.REFUSED
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

    async def aclose(self) -> None:
        self._closing = True
        procs = list(self._procs.items())
        for _, proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        await wait_within([proc.wait() for _, proc in procs], 5)  # 5 s for them all
        for handle, proc in procs:
            if proc.returncode is None:  # SIGTERM ignored
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            self._cleanup(handle)
        self._procs.clear()
        for watcher in list(self._watchers):
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

