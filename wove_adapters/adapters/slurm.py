"""``slurm``: each task is a Slurm batch job; a mapped task is one job array.

Everything goes through Slurm's own commands (``sbatch --parsable``, ``squeue``,
``scontrol``, ``scancel``) run as async subprocesses, so no library is needed and the
loop never blocks. The payload is a file in a directory every node can read
(``spool_dir``, a shared filesystem on a real cluster); the command line carries only its
path. The batch script ``exec``s ``python -m wove_adapters.worker``, so ``scancel``'s
SIGTERM reaches the worker, which reports ``task_cancelled``, and the job's exit code is
the worker's: 2 (``ExitCode=2:0``) says it refused the payload, which it reports no other
way; the run then fails with a PayloadError naming the key, never requeued.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core.aio import submit_grouped
from wove_adapters.core.doctor import Row
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.paths import data_dir
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.stores import write_private
from wove_adapters.worker.runner import EXIT_PAYLOAD_REFUSED, worker_command

# Slurm's job states (squeue %T / scontrol JobState) in the shared vocabulary.
_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SUSPENDED": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "COMPLETED": JobState.SUCCEEDED,
    "CANCELLED": JobState.CANCELLED,
    "FAILED": JobState.FAILED,
    "TIMEOUT": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.FAILED,
    "PREEMPTED": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
    "SPECIAL_EXIT": JobState.FAILED,
    # Ours: FAILED with ExitCode=2:0, the worker's exit code for a payload it refused.
    "REFUSED": JobState.REFUSED,
}
# ``python -m wove_adapters.worker``'s exit status for a payload that does not verify, as
# scontrol shows it (status:signal): the worker signs and sends nothing else for it.
_REFUSED_EXIT = f"{EXIT_PAYLOAD_REFUSED}:0"

# executor_config keys passed straight through as `#SBATCH --key=value`.
_PASSTHROUGH = (
    "partition",
    "account",
    "qos",
    "time",
    "mem",
    "mem-per-cpu",
    "cpus-per-task",
    "gres",
    "constraint",
    "nodelist",
    "exclude",
    "reservation",
    "nice",
    "comment",
)


class SlurmError(RuntimeError):
    """A Slurm command failed; the message carries its stderr."""


class SlurmOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``slurm`` (docs/adapters/slurm.md)."""

    spool_dir: str | None = None  # default: <data dir>/slurm-spool
    python: str | None = None  # default: the caller's sys.executable
    slurm_conf: str | None = None
    slurm_bin: str | None = None
    # Passed through as #SBATCH --key=value (_PASSTHROUGH; dashes or underscores).
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    mem: str | None = None
    mem_per_cpu: str | None = None
    mem_per_cpu_dashed: str | None = msgspec.field(default=None, name="mem-per-cpu")
    cpus_per_task: str | None = None
    cpus_per_task_dashed: str | None = msgspec.field(default=None, name="cpus-per-task")
    gres: str | None = None
    constraint: str | None = None
    nodelist: str | None = None
    exclude: str | None = None
    reservation: str | None = None
    nice: str | None = None
    comment: str | None = None
    sbatch_lines: list[str] = []


class SlurmAdapter(BackendAdapter):
    name = "slurm"
    config_struct = SlurmOptions
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=True,
        inline_payload_limit=1024 * 1024,
        array_jobs=True,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = _STATES
    reconcile_seconds: ClassVar[float] = 3.0
    confirm_poll_seconds: ClassVar[float] = 1.0  # one round is two subprocesses
    # The batch job ends with its task, having delivered or recorded
    # its outcome first.
    after_job: ClassVar[str] = "flushed"

    options: SlurmOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.spool = Path(self.options.spool_dir or data_dir() / "slurm-spool")
        self.python = self.options.python or sys.executable
        self.env = dict(os.environ)
        if self.options.slurm_conf:
            self.env["SLURM_CONF"] = self.options.slurm_conf
        self.bin = Path(self.options.slurm_bin) if self.options.slurm_bin else None
        self.submissions = 0
        self._payloads: dict[str, Path] = {}

    # ------------------------------------------------------------ commands

    def _tool(self, name: str) -> str:
        if self.bin is not None:
            return str(self.bin / name)
        found = shutil.which(name, path=self.env.get("PATH"))
        if found is None:
            raise SlurmError(
                f"'{name}' is not on PATH: install Slurm's client commands (Debian: "
                f"apt-get install slurm-client) or set executor_config.slurm_bin"
            )
        return found

    async def _run(self, *args: str, stdin: bytes | None = None, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            self._tool(args[0]),
            *args[1:],
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        out, err = await proc.communicate(stdin)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {err.decode().strip()}")
        return out.decode()

    async def start(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self._run("sinfo", "-h", "-o", "%P")

    # ------------------------------------------------------------ submit

    def _directives(self, job: JobSpec, name: str, output: str) -> list[str]:
        options = self.options_for(job)
        lines = [f"#SBATCH --job-name={name}", f"#SBATCH --output={output}"]
        for key in _PASSTHROUGH:
            value = options.get(key) or options.get(key.replace("-", "_"))
            if value not in (None, ""):
                lines.append(f"#SBATCH --{key}={value}")
        lines.extend(str(line) for line in options.get("sbatch_lines") or [])
        return lines

    def _script(self, directives: list[str], payload_arg: str) -> str:
        return "\n".join(
            [
                "#!/bin/sh",
                *directives,
                f"exec {shlex.join(worker_command(self.python, '--payload-file'))} {payload_arg}",
                "",
            ]
        )

    def _name_for(self, job: JobSpec) -> str:
        if job.idempotency_key is not None:
            return self.safe_name(f"wove-{job.idempotency_key}", max_len=200)
        return job.job_name

    async def submit(self, job: JobSpec) -> str:
        name = self._name_for(job)
        if job.idempotency_key is not None:
            existing = await self._active_by_name(name)
            if existing is not None:
                return existing
        payload = self.spool / f"{name}.payload"
        await asyncio.to_thread(write_private, payload, job.payload)
        script = self._script(
            self._directives(job, name, str(self.spool / f"{name}.out")), shlex.quote(str(payload))
        )
        job_id = (await self._run("sbatch", "--parsable", stdin=script.encode())).strip()
        self.submissions += 1
        handle = job_id.split(";")[0]
        self._payloads[handle] = payload
        return handle

    async def submit_many(self, jobs: list[JobSpec]) -> list[str]:
        """Jobs with the same options -> one ``sbatch --array=0-(N-1)`` (its directives
        are theirs); handles are ``JOBID_INDEX``."""
        return await submit_grouped(
            jobs, lambda job: json.dumps(job.options, sort_keys=True, default=repr),
            self._submit_array)

    async def _submit_array(self, jobs: list[JobSpec]) -> list[str]:
        tag = f"wove-array-{uuid.uuid4().hex[:12]}"
        for index, job in enumerate(jobs):
            await asyncio.to_thread(
                write_private, self.spool / f"{tag}_{index}.payload", job.payload
            )
        directives = self._directives(jobs[0], tag, str(self.spool / f"{tag}_%a.out"))
        directives.append(f"#SBATCH --array=0-{len(jobs) - 1}")
        payload_arg = shlex.quote(str(self.spool / tag)) + '_"$SLURM_ARRAY_TASK_ID".payload'
        out = await self._run(
            "sbatch", "--parsable", stdin=self._script(directives, payload_arg).encode()
        )
        self.submissions += 1
        job_id = out.strip().split(";")[0]
        handles = [f"{job_id}_{index}" for index in range(len(jobs))]
        for index, handle in enumerate(handles):
            self._payloads[handle] = self.spool / f"{tag}_{index}.payload"
        return handles

    async def _active_by_name(self, name: str) -> str | None:
        out = await self._run("squeue", "-h", "-r", "--name", name, "-o", "%i|%T", check=False)
        for line in out.splitlines():
            job_id, _, state = line.partition("|")
            if self.map_state(state) in (JobState.PENDING, JobState.RUNNING):
                return job_id.strip()
        return None

    # ------------------------------------------------------------ status, cancel

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """One ``scontrol`` (jobs slurmctld still remembers, finished ones for MinJobAge,
        with their exit codes: a refused payload is REFUSED) and one ``squeue`` (array
        tasks one by one) for every handle asked about."""
        table: dict[str, str] = {}
        shown = await self._run("scontrol", "-o", "show", "job", check=False)
        for line in shown.splitlines():
            fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
            job_id = fields.get("JobId", "")
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId", "").isdigit():
                job_id = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            if job_id:
                table[job_id] = _native(fields)
        queued = await self._run("squeue", "-h", "-r", "-o", "%i|%T", check=False)
        for line in queued.splitlines():
            job_id, _, state = line.partition("|")
            table[job_id.strip()] = state.strip()
        return {
            handle: JobState.GONE if (native := table.get(handle)) is None
            else self.map_state(native)
            for handle in handles
        }

    async def waiting_reasons(self, handles: Sequence[str]) -> dict[str, str]:
        """The scheduler's reason for each pending job (``squeue %r``): Resources and
        Priority only wait; a held job (launch failed requeued held, JobHeldAdmin) or
        a drained node waits for an administrator."""
        out = await self._run("squeue", "-h", "-r", "-t", "PENDING", "-o", "%i|%r", check=False)
        reasons = dict(line.partition("|")[::2] for line in out.splitlines())
        return {handle: f"squeue reason: {why}" for handle in handles
                if (why := reasons.get(handle, "").strip()) not in ("", "None")}

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        await self._run("scancel", handle)

    async def release(self, handle: str) -> None:
        path = self._payloads.pop(handle, None)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(FileNotFoundError):
                path.with_suffix(".out").unlink()

    async def detach(self, handle: str) -> None:
        self._payloads.pop(handle, None)  # the job still needs its payload file

    async def doctor(self) -> list[Row]:
        rows: list[Row] = []
        try:
            out = await self._run("sinfo", "-h", "-o", "%P %a %D %T")
            rows.append(("slurmctld reachable (sinfo)", True, out.strip().replace("\n", "; ")))
            idle = any(word in out for word in ("idle", "mixed"))
            rows.append(("a node can take work", idle, "idle or mixed" if idle else
                         "no idle node: scontrol update nodename=... state=resume"))
        except SlurmError as exc:
            rows.append(("slurmctld reachable (sinfo)", False, str(exc)))
        rows.append(("spool dir writable", os.access(self.spool, os.W_OK), str(self.spool)))
        return rows


def _native(fields: dict[str, str]) -> str:
    """A job's state from its ``scontrol`` fields: JobState, except REFUSED for a job
    that failed with the worker's refusal exit code (never a task's failure, exit 1, or
    an undeliverable outcome, exit 3)."""
    state = fields.get("JobState", "")
    if state == "FAILED" and fields.get("ExitCode") == _REFUSED_EXIT:
        return "REFUSED"
    return state

