"""``stdio``: a pool of ``python -m wove_adapters.stdio_worker`` processes over pipes.

Each process runs one task at a time, so cancellation interrupts real work and a worker
that dies mid-task is noticed at once (its event pipe closes), with its exit status; the
pool replaces the process. A busy worker is also sent the next run (``AHEAD``), which
waits in it and starts as soon as the running task ends: the worker never idles for a
round trip through the caller. Cancelling such a run removes it from the worker before
it starts. How the running run ends depends on who ended the worker:

- the task itself (a fault signal such as SIGSEGV or SIGABRT, or ``os._exit``): the run
  fails with ``TaskExecutionError`` of kind ``WorkerCrashed`` naming the pid, exit code
  and signal, as ``ProcessPoolExecutor`` reports a broken pool; rerunning it would crash
  again, so no orphan policy applies;
- something outside (SIGKILL from an operator, the OOM killer): the run is reported lost
  with that reason and the dispatcher applies the orphan policy (requeue, fail, ...).

A run waiting behind it in the dead worker never started: it is reported lost either way,
and its orphan policy applies.

A result the caller cannot unpickle (its class exists only on the worker, or its
unpickling raises) fails its run with an error naming the type and saying so, and the
worker is free for the next task at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import sys
from typing import Any

import msgspec

from wove_adapters.core import frames
from wove_adapters.core.envelope import task_body
from wove_adapters.core.errors import TaskExecutionError
from wove_adapters.core.options import ExecutorOptions
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, StartContext, Transport

_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(frames.WireEvent)

# The worker writes its events to this inherited pipe descriptor (stdout stays the task's).
EVENTS_FD_ENV = "WOVE_ADAPTERS_STDIO_EVENTS_FD"

# Runs sent to a busy worker beyond the one it runs: the next one waits in the worker, so
# it starts as soon as the running task ends (ProcessPoolExecutor queues one call ahead
# too). More would only keep runs from an idle worker.
AHEAD = 1

# Signals a process raises against itself when its own code faults: the task did it.
FAULT_SIGNALS = frozenset(
    {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT, signal.SIGSYS}
)


class _Worker:
    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        events: asyncio.StreamReader,
        pipe: asyncio.BaseTransport,
    ) -> None:
        self.proc = proc
        self.events = events  # the worker's event pipe (see EVENTS_FD_ENV)
        self.pipe = pipe
        # The runs sent to it, in the order it runs them: the first is running (or about
        # to), the one behind it waits in the worker (AHEAD).
        self.runs: collections.deque[RunAttempt] = collections.deque()
        self.reader: asyncio.Task[None] | None = None
        # Its running run was cancelled (or given up: a frozen worker's cancel is never
        # answered): send nothing ahead until that run ends, or a requeued attempt could
        # wait behind it forever.
        self.stopping = False

    def finished(self, event: frames.WireEvent) -> None:
        for index, run in enumerate(self.runs):
            if run.run_id == event.run_id and run.attempt == event.attempt:
                del self.runs[index]
                if index == 0:
                    self.stopping = False
                return

    async def send(self, command: frames.WireCommand) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(_encoder.encode(command) + b"\n")
        await self.proc.stdin.drain()


class StdioOptions(ExecutorOptions, kw_only=True):
    """``executor_config`` of ``stdio`` (see docs/executors.md)."""

    # Worker processes; unset: the number of CPUs, at most 8.
    processes: int | None = None
    # The interpreter that runs ``python -m wove_adapters.stdio_worker``.
    python: str | None = None
    # Extra environment variables for the workers (values ``str()``-ed).
    env: dict[str, Any] = {}


class StdioTransport(Transport):
    name = "stdio"
    config_struct = StdioOptions
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

    async def start(self, context: StartContext) -> None:
        context.check_options(StdioOptions, self.name)
        environment, executor_config = context.environment, context.executor_config
        self._emit = context.emit
        self._size = _pool_size(environment, executor_config.get("processes"))
        python = str(executor_config.get("python") or sys.executable)
        self._command = [python, "-m", "wove_adapters.stdio_worker"]
        self._env = {
            **os.environ,
            **{k: str(v) for k, v in (executor_config.get("env") or {}).items()},
        }
        await asyncio.gather(*(self._spawn() for _ in range(self._size)))

    async def _spawn(self) -> _Worker:
        """Start one worker. Its events come on a pipe of their own, so the task's
        ``print()`` goes to the caller's stdout, as with a thread or process pool."""
        loop = asyncio.get_running_loop()
        read_fd, write_fd = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._command,
                stdin=asyncio.subprocess.PIPE,
                env={**self._env, EVENTS_FD_ENV: str(write_fd)},
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the worker holds the only write end: EOF when it dies
        events = asyncio.StreamReader(limit=1 << 30, loop=loop)
        pipe, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(events, loop=loop),
            os.fdopen(read_fd, "rb", buffering=0),
        )
        worker = _Worker(proc, events, pipe)
        worker.reader = loop.create_task(self._read(worker))
        self._workers.append(worker)
        return worker

    @property
    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers]

    async def _read(self, worker: _Worker) -> None:
        assert self._emit is not None
        while True:
            line = await worker.events.readline()
            if not line:
                break
            try:
                event = _event_decoder.decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                print(f"stdio executor: bad event line ignored: {exc}", file=sys.stderr)
                continue
            if isinstance(event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled)):
                worker.finished(event)  # free before anything that may fail below
            self._emit(event_frame(event, where="stdio executor"))
            if len(worker.runs) < AHEAD + 1 and self._pending:
                await self._dispatch()
        worker.pipe.close()
        code = await worker.proc.wait()
        lost = list(worker.runs)
        worker.runs.clear()
        with contextlib.suppress(ValueError):
            self._workers.remove(worker)
        if lost and not self._closing:
            name = f"stdio worker pid {worker.proc.pid}"
            running = lost[0]
            self._emit(
                exit_frame(
                    name,
                    code,
                    running.run_id,
                    running.task_id,
                    running.attempt,
                    by_task=code >= 0 or -code in FAULT_SIGNALS,
                )
            )
            for queued in lost[1:]:
                # It waited in the worker behind the run that was running: its task never
                # started, whoever ended the worker. Lost, for its orphan policy.
                self._emit(
                    frames.event(
                        frames.TASK_LOST,
                        queued.run_id,
                        queued.task_id,
                        queued.attempt,
                        reason=f"{name} {describe_exit(code)} while task '{queued.task_id}' "
                        f"(run {queued.run_id}) waited in it behind run {running.run_id}; "
                        f"it never started",
                    )
                )
        if not self._closing:
            await self._spawn()
            await self._dispatch()

    async def _dispatch(self) -> None:
        """Hand queued runs to workers: idle ones first, then one run ahead to each busy
        one (it starts the moment the running task ends, without waiting for a round
        trip through this process)."""
        for depth in range(AHEAD + 1):
            for worker in self._workers:
                if not self._pending:
                    return
                if (
                    len(worker.runs) == depth
                    and worker.proc.returncode is None
                    and not (depth and worker.stopping)
                ):
                    run = self._pending.popleft()
                    worker.runs.append(run)
                    try:
                        await worker.send(
                            frames.RunTaskWire(
                                run_id=run.run_id,
                                task_id=run.task_id,
                                attempt=run.attempt,
                                body=run.extra["body"],
                                heartbeat_seconds=run.policy.heartbeat_seconds,
                                task_logs=run.policy.task_logs,
                                task_output=run.policy.task_output,
                                trace=run.extra.get("trace"),
                            )
                        )
                    except (ConnectionError, RuntimeError):
                        # The worker is dying; its reader reports the run lost.
                        pass

    async def submit(self, run: RunAttempt) -> None:
        if "body" not in run.extra:
            run.extra["body"] = task_body(run.func, run.args)
        self._pending.append(run)
        await self._dispatch()

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        for queued in list(self._pending):
            if queued.run_id == run.run_id and queued.attempt == run.attempt:
                self._pending.remove(queued)
                assert self._emit is not None
                self._emit(
                    frames.event_of(
                        run, frames.TASK_CANCELLED,
                        reason="removed from the queue",
                    )
                )
                return
        for worker in self._workers:
            if worker.runs and worker.runs[0].run_id == run.run_id:
                worker.stopping = True
            if any(sent.run_id == run.run_id for sent in worker.runs):
                # Running: the worker interrupts it; waiting there: the worker drops it,
                # and it never starts. Either way its task_cancelled says so.
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await worker.send(frames.CancelTaskWire(run_id=run.run_id))
                return

    async def aclose(self) -> None:
        self._closing = True
        for worker in list(self._workers):
            with contextlib.suppress(Exception):
                await worker.send(frames.ShutdownWire())
                assert worker.proc.stdin is not None
                worker.proc.stdin.close()
        readers = [worker.reader for worker in self._workers if worker.reader is not None]
        for worker in list(self._workers):
            try:
                await asyncio.wait_for(worker.proc.wait(), 3)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()
        # Each reader ends at its worker's EOF; none outlives the transport.
        if readers:
            _, pending = await asyncio.wait(readers, timeout=3)
            for reader in pending:
                reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _pool_size(environment: str, processes: Any) -> int:
    if processes is None:
        return min(os.cpu_count() or 2, 8)
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(
            f"Environment '{environment}': executor_config.processes must be greater than 0 "
            f"(got {processes!r}); it is the number of stdio worker processes"
        )
    return processes


# ---------------------------------------------------------------- shared with ``process``


def describe_exit(code: int) -> str:
    """``exited with code -11 (killed by signal 11, SIGSEGV)``: the code as asyncio
    reports it, and the signal by name."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "unknown signal"
    return f"exited with code {code} (killed by signal {-code}, {name})"


def exit_frame(
    worker: str, code: int, run_id: str, task_id: str, attempt: int, *, by_task: bool
) -> dict[str, Any]:
    """The event for a run whose worker process died before reporting its outcome.

    ``by_task``: the task ended its own process (a fault signal, ``os._exit``), so the run
    fails with ``WorkerCrashed`` and the reason; otherwise the worker was ended from
    outside and the run is lost, for the dispatcher's orphan policy.
    """
    what = f"{worker} {describe_exit(code)} while running task '{task_id}' (run {run_id})"
    if not by_task:
        return frames.event(frames.TASK_LOST, run_id, task_id, attempt, reason=what)
    payload = frames.ErrorPayload(
        kind="WorkerCrashed",
        message=f"{what}, before it could report an outcome: the task ended its own process "
        "(a crash in native code, an abort, or os._exit). The worker is replaced; the run "
        "is not retried, as it would most likely crash again.",
        source="worker",
    ).to_dict()
    return frames.event(
        frames.TASK_ERROR,
        run_id,
        task_id,
        attempt,
        error=payload,
        exception=TaskExecutionError(payload),
    )


def event_frame(event: frames.WireEvent, *, where: str) -> dict[str, Any]:
    """``runtime.wire_to_frame``, except that unpickling never escapes: a result the caller
    cannot unpickle becomes that run's error, and an exception that cannot be rebuilt
    becomes ``TaskExecutionError``; a rebuilt exception gets the worker's traceback as
    its cause (``core.codec``). Unpickling runs arbitrary code (a ``__reduce__`` may
    even call ``sys.exit``); here it runs on the shared loop, which must survive it. A
    result or exception sent by reference that is missing or tampered with is the run's
    error (``StoredResultError``, nothing unpickled); such events block on their store, so
    their reader calls this in a thread."""
    from wove_adapters.core.codec import StoredResultError, wire_to_frame

    try:
        frame = wire_to_frame(event)
    except asyncio.CancelledError:
        raise
    except StoredResultError as exc:
        return frames.error_event(
            event.run_id, event.task_id, exc, attempt=event.attempt, source="transport"
        )
    except BaseException as exc:
        if isinstance(event, frames.TaskResult):
            return _unpicklable_result(event, exc)
        if isinstance(event, frames.TaskError):
            from wove_adapters.core.codec import rebuild_exception

            payload = event.error.to_dict()
            return frames.event_of(
                event, frames.TASK_ERROR,
                error=payload,
                exception=rebuild_exception(payload, None),
            )
        print(f"{where}: an event could not be read and was dropped: {exc!r}", file=sys.stderr)
        return frames.event_of(
            event, frames.LOG,
            message=f"unreadable event dropped: {exc!r}",
            level="warning",
        )
    if isinstance(event, frames.TaskError) and isinstance(frame.get("exception"), BaseException):
        from wove_adapters.core.codec import attach_remote_traceback

        # The caller's exception carries the task's own frames (idempotent).
        attach_remote_traceback(frame["exception"], event.error.traceback)
    return frame


def _unpicklable_result(event: frames.TaskResult, exc: BaseException) -> dict[str, Any]:
    import traceback

    names = pickled_names(event.result)
    refers = f" The result refers to {', '.join(names)}." if names else ""
    payload = frames.ErrorPayload(
        kind="ResultNotUnpicklable",
        message=(
            f"task '{event.task_id}' (run {event.run_id}) returned a result that could not "
            f"be unpickled in the caller: {type(exc).__name__}: {exc}.{refers} Make the "
            "result's type importable where the task was submitted (install its module "
            "there or add it to PYTHONPATH), or return plain data."
        ),
        traceback="".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        source="transport",
    ).to_dict()
    error = TaskExecutionError(payload)
    error.__cause__ = exc
    return frames.event_of(
        event, frames.TASK_ERROR,
        error=payload,
        exception=error,
    )


_PLUMBING = ("builtins.", "copyreg.", "_codecs.", "cloudpickle.", "__builtin__.", "copy_reg.")


def pickled_names(data: bytes, limit: int = 5) -> list[str]:
    """The ``module.Name`` globals a pickle refers to, without unpickling it (pickle's
    own plumbing left out): what the caller would need to import."""
    import pickletools

    names: list[str] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values pushed since the last other opcode
    try:
        for opcode, arg, _ in pickletools.genops(data):
            op = opcode.name
            if op in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                recent.append(arg)
                continue
            if op == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            if op in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(str(arg))] = recent[-1] if recent else None
                continue
            if op in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(str(arg))))
                continue
            name = None
            if op == "STACK_GLOBAL" and len(recent) >= 2:
                module, qualname = recent[-2], recent[-1]
                if isinstance(module, str) and isinstance(qualname, str):
                    name = f"{module}.{qualname}"
            elif op == "GLOBAL" and isinstance(arg, str):
                name = arg.replace(" ", ".")
            recent = []
            if name and not name.startswith(_PLUMBING) and name not in names:
                names.append(name)
                if len(names) >= limit:
                    break
    except Exception:  # a truncated or odd pickle: report what was found
        pass
    return names
