"""``ray``: tasks run as Ray tasks, one Ray task per attempt.

The adapter connects the calling process to Ray once (``address`` of a running cluster, or
a local Ray it starts itself) and creates one remote function, ``run_ray`` from
``worker.hosted``, with the configured ``ray.remote`` options; per-task options go through
``.options()``. Ray ships the function by reference, so any Ray worker whose Python has
wove-adapters installed runs payloads: a cluster started with ``ray start`` needs nothing
registered. The worker verifies the signed payload before anything is unpickled, then

- ``return_path: "http"`` (default) / ``"redis"``: runs it with ``worker.runner``,
  which reports ``task_started``, heartbeats and the terminal event to the caller, or
- ``return_path: "native"``: runs it and returns the value (raises the task's exception),
  so the ObjectRef itself carries the outcome and the adapter emits the events.

Either way every ObjectRef is watched without blocking the loop (a done-callback on
``ref.future()``): a cancellation, a dead worker or node (a lost run: Ray's own retries
are off by default so the orphan policy owns requeue), a refused payload (the worker
signs and sends nothing for a payload that does not verify; its task fails with
``PayloadRefused``: the run's PayloadError names the key, never requeued) and an error of
the wrapper itself become events, so no run waits for a reconciliation tick.

Cancellation asks first (``ray.cancel``: Ray interrupts the task's main thread, which the
worker turns into ``task_cancelled``) and, when the task has not stopped after
``force_cancel_after`` seconds (a task blocked in C code never sees the interrupt), kills
it with ``ray.cancel(force=True)``; Ray then reports the task cancelled, which is the
confirmation ``require_ack`` waits for. This module must not import ray at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.callbacks.inbox import Watched, failure_frame, refusal_frame
from wove_adapters.core import frames
from wove_adapters.core.doctor import Row, checked_row
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, FinishedStates, JobState
from wove_adapters.worker import hosted

log = logging.getLogger("wove_adapters.adapters.ray")

# ``ray.remote`` options accepted at the top level of executor_config (the rest go in
# ``remote_options``); per-task options arrive through ``task_options``.
REMOTE_OPTIONS = (
    "accelerator_type", "label_selector", "max_retries", "memory", "num_cpus", "num_gpus",
    "resources", "retry_exceptions", "runtime_env", "scheduling_strategy",
)
# Our orphan policy owns requeue: Ray re-running a task whose worker died would hide the
# loss (and run the task twice behind the caller's back).
DEFAULT_REMOTE_OPTIONS: dict[str, Any] = {"max_retries": 0}
# Ray errors that mean the run was lost (the worker, its node or the object is gone).
LOST_ERRORS = frozenset({
    "WorkerCrashedError", "NodeDiedError", "LocalRayletDiedError", "OwnerDiedError",
    "ObjectLostError", "OutOfMemoryError", "RaySystemError", "ActorDiedError",
})
_SUBMIT_IN_THREAD = 64 * 1024  # payloads this large go to the object store: off the loop
_CONNECT_LOCK = threading.Lock()


# ---------------------------------------------------------------- the caller side


@dataclass
class _Tracked(Watched):
    ref: Any = None
    escalation: asyncio.Task[None] | None = None


class RayOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``ray`` (docs/adapters/ray.md)."""

    address: str = "local"
    init: dict[str, Any] = {}
    remote_options: dict[str, Any] = {}
    force_cancel_after: float = 2.0
    # ray.remote options accepted at the top level (REMOTE_OPTIONS).
    accelerator_type: str | None = None
    label_selector: dict[str, Any] | None = None
    max_retries: int | None = None
    memory: float | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    resources: dict[str, Any] | None = None
    retry_exceptions: Any = None  # a bool or a list of exception types
    runtime_env: dict[str, Any] | None = None
    scheduling_strategy: Any = None  # a string or a Ray strategy object


class RayAdapter(BackendAdapter):
    name = "ray"
    config_struct = RayOptions
    required_modules = ("ray",)
    capabilities = Capabilities.backend(
        cancel_running=True,
        confirm_cancel=True,
        native_idempotency=False,  # Ray has no dedupe: the ledger and dispatcher do it
        native_result=True,
        detach=False,  # Ray tasks share the fate of the driver that submitted them
        inline_payload_limit=256 * 1024 * 1024,  # args travel through Ray's object store
        chunks=True,
    )
    # Native states: Ray's task states (state API) plus what an ObjectRef says.
    STATE_MAP: ClassVar[dict[str, JobState]] = {
        "PENDING_ARGS_AVAIL": JobState.PENDING,
        "PENDING_NODE_ASSIGNMENT": JobState.PENDING,
        "PENDING_OBJ_STORE_MEM_AVAIL": JobState.PENDING,
        "PENDING_ARGS_FETCH": JobState.PENDING,
        "SUBMITTED_TO_WORKER": JobState.PENDING,
        "RUNNING": JobState.RUNNING,
        "RUNNING_IN_RAY_GET": JobState.RUNNING,
        "RUNNING_IN_RAY_WAIT": JobState.RUNNING,
        "FINISHED": JobState.SUCCEEDED,
        "FAILED": JobState.FAILED,
        "CANCELLED": JobState.CANCELLED,
        "LOST": JobState.GONE,
        "REFUSED": JobState.REFUSED,  # ours: the worker refused the payload
    }

    options: RayOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.address = self.options.address
        self.init_options = self.options.init
        self.remote_options: dict[str, Any] = {
            **DEFAULT_REMOTE_OPTIONS,
            **{key: config[key] for key in REMOTE_OPTIONS if key in config},
            **self.options.remote_options,
        }
        self.force_cancel_after = self.options.force_cancel_after
        self._ray: Any = None
        self._remote: Any = None
        self._exported = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._finished: FinishedStates[str] = FinishedStates()
        # The transport's check of events a worker returned signed (``attach_signed``);
        # None: every outcome comes by the return path the envelope names.
        self._accept: Callable[[bytes], JobState] | None = None
        # Refs Ray finished, waiting for the loop: one wake-up for all that finish
        # before the loop gets to them, not one per ref (``_settle_soon``).
        self._done: list[tuple[str, _Tracked, Any]] = []
        self._done_lock = threading.Lock()

    def attach_signed(self, accept: Callable[[bytes], JobState]) -> None:
        """On the http return path: a run that ends within the short-task window
        returns its signed terminal event in the ObjectRef (``hosted.run_returned``)
        and ``accept`` checks and routes it, so a short run costs no HTTP request."""
        self._accept = accept

    # ---------------------------------------------------------- life cycle

    async def start(self) -> None:
        import ray

        self._ray = ray
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._connect)
        # One remote function per environment, created here and never per submit.
        self._remote = ray.remote(**self.remote_options)(hosted.run_ray)

    def _connect(self) -> None:
        """Connect this process to Ray (one connection per process, shared)."""
        ray = self._ray
        with _CONNECT_LOCK:
            if ray.is_initialized():
                current = ray.get_runtime_context().gcs_address
                if not _same_cluster(self.address, current):
                    raise RuntimeError(
                        f"Environment '{self.environment}' wants the Ray cluster at "
                        f"{self.address!r}, but this process is already connected to "
                        f"{current!r}; Ray allows one cluster per process"
                    )
                return
            if self.address == "local":
                ray.init(address="local", **{"include_dashboard": False, **self.init_options})
                return
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **self.init_options)
            except Exception as exc:
                raise _connection_error(self.address, exc) from exc

    async def aclose(self) -> None:
        # The Ray connection is per process and may serve other environments; Ray's own
        # exit hook disconnects it (and stops a local Ray).
        for tracked in self._tracked.values():
            if tracked.escalation is not None:
                tracked.escalation.cancel()
        self._tracked.clear()

    # ---------------------------------------------------------- the three primitives

    async def submit(self, job: JobSpec) -> str:
        remote = self._remote.options(**job.options) if job.options else self._remote
        # ``returned`` only when true: a worker whose run_ray predates the argument still
        # runs payloads of a caller that does not take outcomes from the ObjectRef.
        args = (job.payload, True) if self._accept is not None else (job.payload,)
        if not self._exported or len(job.payload) > _SUBMIT_IN_THREAD:
            # The first call exports the function to the cluster; a large argument is
            # copied into the object store: both block, so neither runs on the loop.
            ref = await asyncio.to_thread(remote.remote, *args)
            self._exported = True
        else:
            ref = remote.remote(*args)
        handle = str(ref.hex())
        tracked = _Tracked(job.run_id, job.task_id, job.attempt, ref)
        self._tracked[handle] = tracked
        ref.future().add_done_callback(lambda done: self._settle_soon(handle, tracked, done))
        return handle

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        tracked = self._tracked.get(handle)
        if tracked is None:
            return
        force = running and self.force_cancel_after <= 0
        await asyncio.to_thread(self._ray.cancel, tracked.ref, force=force)
        if running and not force and tracked.escalation is None:
            assert self._loop is not None
            tracked.escalation = self._loop.create_task(self._escalate(handle, tracked))

    async def _escalate(self, handle: str, tracked: _Tracked) -> None:
        """A task that ignored the interrupt (blocked in C code) is killed."""
        await asyncio.sleep(self.force_cancel_after)
        if self._tracked.get(handle) is tracked:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._ray.cancel, tracked.ref, force=True)

    async def status(self, handle: str) -> JobState:
        if handle in self._tracked:
            # Unfinished: Ray's per-task state lives in its state API (dashboard); the
            # ObjectRef only says the task is queued or running.
            return JobState.RUNNING
        return self.map_state(self._finished.get(handle, "LOST"))

    # ---------------------------------------------------------- the ObjectRef as a return path

    def _settle_soon(self, handle: str, tracked: _Tracked, done: Any) -> None:
        """Ray's callback thread: hand the finished ref to the loop. Refs that finish
        while the loop has not yet taken the earlier ones join them: one wake-up of the
        loop (a write to its self-pipe, a turn of it) for a burst, not one per run."""
        assert self._loop is not None
        with self._done_lock:
            self._done.append((handle, tracked, done))
            if len(self._done) > 1:
                return  # the loop is already called for the list
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is exiting
            self._loop.call_soon_threadsafe(self._settle_done)

    def _settle_done(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
        for handle, tracked, future in done:
            self._settle(handle, tracked, future)

    def _settle(self, handle: str, tracked: _Tracked, done: Any) -> None:
        if self._tracked.get(handle) is tracked:
            del self._tracked[handle]
        tracked.ref = None  # the last reference: Ray may free the object
        if tracked.escalation is not None:
            tracked.escalation.cancel()
        state, frame = self._outcome(tracked, done)
        self._finished.remember(handle, state)
        self.report(frame)

    def _outcome(self, tracked: _Tracked, done: Any) -> tuple[str, dict[str, Any] | None]:
        """(native state, frame to emit) for a finished ObjectRef future."""
        try:
            value = done.result()
        except BaseException as exc:  # every Ray error becomes an event
            kinds = {cls.__name__ for cls in type(exc).__mro__}
            if "TaskCancelledError" in kinds:
                return "CANCELLED", frames.event_of(tracked, frames.TASK_CANCELLED,
                                              reason="Ray cancelled the task")
            cause = getattr(exc, "cause", None) if "RayTaskError" in kinds else None
            if kinds & LOST_ERRORS or isinstance(cause, hosted.OutcomeUndelivered):
                return "LOST", frames.event_of(tracked, frames.TASK_LOST, reason=(
                    f"Ray lost the task ({type(exc).__name__}: {_first_line(exc)})"))
            if isinstance(cause, hosted.PayloadRefused):  # the worker signed and sent nothing
                return "REFUSED", refusal_frame(self.name, tracked, self.config)
            if isinstance(cause, BaseException):
                # The worker's own traceback: Ray ships it as text beside the cause.
                remote = str(getattr(exc, "traceback_str", "") or "")
                return "FAILED", failure_frame(tracked, cause, native=self.native,
                                               remote_tb=remote)
            return "FAILED", frames.error_event(tracked.run_id, tracked.task_id, exc,
                                                attempt=tracked.attempt, source="backend")
        if isinstance(value, hosted.NativeCancelled):
            return "CANCELLED", frames.event_of(tracked, frames.TASK_CANCELLED, reason=value.reason)
        if isinstance(value, bytes) and self._accept is not None:
            try:  # the worker's signed events: checked, then routed as the receiver would
                return _STATE_OF_OUTCOME.get(self._accept(value), "FINISHED"), None
            except Exception as exc:  # nothing routed, nothing unpickled
                return "LOST", frames.event_of(tracked, frames.TASK_LOST, reason=(
                    f"the outcome the Ray task returned did not verify "
                    f"({type(exc).__name__}: {_first_line(exc)})"))
        if self.native:
            return "FINISHED", frames.event_of(tracked, frames.TASK_RESULT, result=value)
        # The worker already reported (and was acknowledged); the ref says how it ended.
        return _STATE_OF_OUTCOME.get(str(value), "FINISHED"), None

    async def doctor(self) -> list[Row]:
        ray = self._ray
        if ray is None or not ray.is_initialized():
            return [("ray cluster reachable", False, "the adapter is not started")]
        rows: list[Row] = [(
            "ray cluster reachable", True,
            f"{ray.get_runtime_context().gcs_address} (Ray {ray.__version__})",
        )]
        nodes = [node for node in await asyncio.to_thread(ray.nodes) if node.get("Alive")]
        cpus = sum(float(node.get("Resources", {}).get("CPU", 0)) for node in nodes)
        rows.append(("ray nodes alive", bool(nodes) and cpus > 0,
                     f"{len(nodes)} nodes, {cpus:g} CPUs" if nodes else
                     "no live node: start one with 'ray start --address=HEAD:PORT'"))

        async def probe() -> Any:
            return await ray.remote(max_retries=0, num_cpus=0)(hosted.worker_ready).remote()

        rows.append(await checked_row(
            "ray workers import wove_adapters", asyncio.wait_for(probe(), 60), str,
            lambda exc: f"{type(exc).__name__}: {_first_line(exc)}; pip install "
                        f"'wove-adapters[ray]' in every node's Python (or runtime_env)"))
        retries = self.remote_options.get("max_retries")
        rows.append(("ray max_retries is 0", retries == 0,
                     "a dead worker fails the task, so the orphan policy applies"
                     if retries == 0 else
                     f"max_retries={retries}: Ray re-runs a task whose worker died before "
                     f"wove-adapters sees a loss (the orphan policy applies after that)"))
        return rows


_STATE_OF_OUTCOME = {
    "succeeded": "FINISHED",
    "failed": "FAILED",
    "cancelled": "CANCELLED",
    "refused": "FAILED",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _host_port(address: str) -> tuple[str, int] | None:
    if "://" in address:
        return None
    host, _, port = address.rpartition(":")
    return (host or "127.0.0.1", int(port)) if port.isdigit() else None


def _same_cluster(wanted: str, current: str) -> bool:
    """A configured address matches this process's connection (``local``/``auto`` and
    Ray Client addresses accept whatever the process is connected to)."""
    target = _host_port(wanted)
    return target is None or _host_port(current) == target or wanted == current


def _connection_error(address: str, exc: BaseException) -> ConnectionError:
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:  # Ray wraps the real reason
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(error) for error in chain)
    if "InvalidAuthToken" in text or "AuthenticationError" in text:
        return ConnectionError(
            f"The Ray cluster at {address!r} uses token authentication (recent Ray turns "
            f"it on for a head that finds a token, e.g. the ~/.ray/auth_token a local "
            f"ray.init() writes) and this process sent none: export RAY_AUTH_MODE=token "
            f"and the cluster's token "
            f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) before starting "
            f"it ({type(exc).__name__}: {_first_line(exc)})"
        )
    return ConnectionError(
        f"Cannot connect to the Ray cluster at {address!r}: {type(exc).__name__}: "
        f"{_first_line(exc)}. Start one with 'ray start --head --port=PORT' (not 6379 if "
        f"Redis runs there) or use address 'local'"
    )


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's long connection retries, on a wrong address."""
    target = _host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=5):
            pass
    except OSError as exc:
        raise ConnectionError(
            f"Cannot reach the Ray cluster at {address!r} ({exc}). Start one with "
            f"'ray start --head --port={target[1]}' or use address 'local'"
        ) from exc
