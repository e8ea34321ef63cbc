"""The adapter contract and the transport that drives any adapter.

An adapter fills three primitives for its job system (``submit``, ``cancel``, ``status``),
declares ``Capabilities`` honestly, and maps its native states into ``JobState``. All the
shared machinery (signed payloads, the payload store, the callback receiver, the ledger,
reconciliation) lives in ``AdapterTransport``, so an adapter fits in a screenful or three.

Which class a name means is the registry's job (``adapters/registry.py``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from wove_adapters.callbacks.receiver import CallbackReceiver, get_receiver
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames
from wove_adapters.core.options import AdapterOptions, check_executor_config
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.transport import Emit, RunAttempt, Transport, gather_statuses

log = logging.getLogger("wove_adapters.adapters")


@dataclass
class JobSpec:
    """What an adapter submits: the signed payload text plus naming hints."""

    run_id: str
    task_id: str
    attempt: int
    payload: str  # "wove1.…" - verify-before-unpickle, safe in env vars (if small)
    idempotency_key: str | None
    job_name: str  # a readable, backend-safe default name
    environment: str
    delivery: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # per-task pass-through


_Adapter = TypeVar("_Adapter", bound="BackendAdapter")


class BackendAdapter(abc.ABC):
    """The per-backend piece. Promises:

    - ``start``: connect (clients are shared per process and configuration); raise a clear
      error if the backend is unreachable.
    - ``submit``: hand the payload to the backend without blocking the loop; return the
      backend's handle. With ``capabilities.native_idempotency`` the same
      ``idempotency_key`` must yield one backend job.
    - ``cancel``: ask the backend to stop the job (queued and, where declared, running).
    - ``status``: the backend's view, mapped with ``STATE_MAP`` (UNKNOWN fallback).
    - ``status_many``: the same for many handles at once. The transport asks it once per
      reconciliation tick (and once per confirmation round) for every job it wonders
      about; an adapter whose backend answers many jobs in one request overrides it,
      and keeps no status cache of its own.
    - ``aclose``: release clients.

    ``async with adapter:`` starts it and closes it (scripts and tests; the transport
    calls ``start`` and ``aclose`` itself).
    """

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    required_modules: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities(status=True)
    STATE_MAP: ClassVar[dict[str, JobState]] = {}
    # Every executor_config key the adapter reads (an AdapterOptions subclass, declared
    # at the top of its module); unknown keys then fail at start-up. None: not declared
    # (a third-party adapter), nothing is checked.
    config_struct: ClassVar[type[AdapterOptions] | None] = None
    # How long a run may stay silent before its job's status is checked.
    reconcile_seconds: ClassVar[float] = 2.0
    # How often require_ack cancels waiting for the backend's confirmation are polled
    # (one status_many for all of them): slower for backends where one round is a LIST,
    # a paid API call or a subprocess.
    confirm_poll_seconds: ClassVar[float] = 0.1
    # What the process that ran a job does with an outcome the caller did not take yet,
    # once the backend reports the job finished (see AdapterTransport.status):
    # "retries": it lives on (a worker pool) and its outbox keeps trying for
    #   worker_retry_seconds, having recorded the outcome in the ledger;
    # "settled": it exits with the job (a work-horse) once the outcome is delivered or
    #   recorded, after up to worker_exit_flush_seconds of retries for a caller that may
    #   be alive;
    # "flushed": it exits (``python -m wove_adapters.worker``) only after those retries,
    #   so the ledger is the only place left to look.
    after_job: ClassVar[str] = "retries"

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        self.config = config
        self.environment = environment
        self.emit: Emit | None = None

    async def start(self) -> None:
        """Connect; default: nothing to do."""

    @abc.abstractmethod
    async def submit(self, job: JobSpec) -> str: ...

    @abc.abstractmethod
    async def cancel(self, handle: str, *, running: bool = True) -> None: ...

    @abc.abstractmethod
    async def status(self, handle: str) -> JobState: ...

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """``{handle: state}``; a handle left out could not be told this time (never a
        verdict). Default: ``status`` of each, a bounded number at a time."""
        return await gather_statuses(self.status, {handle: handle for handle in handles})

    async def detach(self, handle: str) -> None:
        """Leave the job running without us (default: nothing to let go of)."""

    async def submit_many(self, jobs: list[JobSpec]) -> list[str]:
        """Submit several jobs at once (``capabilities.array_jobs``: one array job).
        Returns one handle per job, in order. Default: one by one."""
        return [await self.submit(job) for job in jobs]

    async def release(self, handle: str) -> None:
        """The run ended: remove per-job files or records (default: nothing)."""

    async def drain(self) -> None:
        """Shutdown, after orphan policies and before the dispatcher's last ledger write:
        let work that must end with this process end (default: nothing to wait for)."""

    async def aclose(self) -> None:
        """Release clients; default: nothing."""

    async def __aenter__(self: _Adapter) -> _Adapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def doctor(self) -> list[tuple[str, bool, str]]:
        """Checks for ``wove-adapters doctor``: (what, ok, detail) rows, e.g. broker
        reachable, a worker listening on the queue. Each failing row says what to do."""
        return []

    @classmethod
    def map_state(cls, native: object) -> JobState:
        from wove_adapters.core.policies import map_state

        return map_state(cls.STATE_MAP, native)

    @staticmethod
    def safe_name(text: str, *, allowed: str = r"A-Za-z0-9_\-", max_len: int = 128) -> str:
        """A backend-safe name from any key: disallowed characters become ``-``; a long
        name keeps a digest of the whole so distinct keys stay distinct."""
        import hashlib

        cleaned = re.sub(f"[^{allowed}]", "-", text)
        if len(cleaned) > max_len or cleaned != text:
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            cleaned = f"{cleaned[: max_len - 13]}-{digest}"
        return cleaned


# ---------------------------------------------------------------- the transport


class AdapterTransport(Transport):
    """Turns any BackendAdapter into a transport: payloads out, receiver events in."""

    def __init__(self, adapter_cls: type[BackendAdapter]) -> None:
        self.adapter_cls = adapter_cls
        self.name = adapter_cls.name
        self.capabilities = adapter_cls.capabilities
        self.reconcile_seconds = adapter_cls.reconcile_seconds
        self.adapter: BackendAdapter | None = None
        self.receiver: CallbackReceiver | None = None
        self._emit: Emit | None = None
        self._config: dict[str, Any] = {}
        self._key_id = ""
        self._ledger_url: str | None = None
        self._store_url: str | None = None
        self._environment = ""
        self._body_refs: dict[str, payload_mod.BodyRef] = {}
        self._batch: list[tuple[JobSpec, asyncio.Future[str]]] = []
        self._worker_bounds: dict[str, Any] = {}
        # Runs whose job ended without their terminal event: when we first saw it.
        self._ended_quiet: dict[str, float] = {}
        self._delivery_grace = (0.0, 0.0)
        # require_ack cancels waiting for the backend to confirm: (run id, attempt) ->
        # (the attempt, deadline); one task polls them all (_confirm).
        self._confirming: dict[tuple[str, int], tuple[RunAttempt, float]] = {}
        self._confirmer: asyncio.Task[None] | None = None
        self.stats: dict[str, int] = {"array_submissions": 0, "single_submissions": 0}

    async def start(
        self,
        *,
        environment: str,
        executor_config: dict[str, Any],
        settings: dict[str, Any],
        emit: Emit,
    ) -> None:
        # Before the receiver binds or the backend is contacted: a typo fails here.
        check_executor_config(
            self.adapter_cls.config_struct, executor_config,
            environment=environment, executor=self.name,
        )
        self._emit = emit
        self._config = executor_config
        self._environment = environment
        self._key_id = executor_config["_key_id"]
        self._ledger_url = executor_config.get("_ledger_url")
        self._store_url = executor_config.get("payload_store")
        self._worker_bounds = worker_bounds(executor_config)
        self._delivery_grace = delivery_grace(self._worker_bounds, self.adapter_cls.after_job)
        if executor_config.get("return_path") == "redis":
            from wove_adapters.callbacks.dropbox import get_dropbox

            url = str(executor_config.get("return_redis_url") or "redis://127.0.0.1:6379/0")
            self.receiver = await get_dropbox(url)
        elif not native_only(self.adapter_cls, executor_config):
            self.receiver = await get_receiver(executor_config, environment=environment)
        self.adapter = self.adapter_cls(executor_config, environment=environment)
        self.adapter.emit = emit
        await self.adapter.start()
        # An adapter may refine its capabilities from its configuration.
        self.capabilities = self.adapter.capabilities

    def return_path(self, run: RunAttempt) -> payload_mod.ReturnPath:
        kind = str(self._config.get("return_path", "http"))
        if kind == "native" and native_only(self.adapter_cls, self._config):
            # The backend hands the outcome back itself (the adapter emits it).
            return payload_mod.ReturnPath(kind="native")
        assert self.receiver is not None
        if kind == "redis":
            from wove_adapters.callbacks.dropbox import DropboxReader

            assert isinstance(self.receiver, DropboxReader)
            return payload_mod.ReturnPath(
                kind="redis", url=self.receiver.redis_url, key=self.receiver.key
            )
        return payload_mod.ReturnPath(kind="http", url=self.receiver.url)

    async def submit(self, run: RunAttempt) -> None:
        assert self.adapter is not None
        delivery = run.policy.as_delivery(run.idempotency_key)
        if self.receiver is not None:
            self.receiver.register(run.run_id, self._sink)
        limit = int(
            self._config.get("inline_payload_limit") or self.capabilities.inline_payload_limit
        )
        body = run.extra.get("body")
        if body is None:
            body = payload_mod.dumps((run.func, run.args))  # small tasks: cheaper than a thread hop
        large = len(body) > min(limit, 256 * 1024)
        build = functools.partial(
            payload_mod.build_envelope,
            adapter=self.name,
            run_id=run.run_id,
            task_id=run.task_id,
            attempt=run.attempt,
            func=run.func,
            args=run.args,
            return_path=self.return_path(run),
            delivery=delivery,
            key_id=self._key_id,
            inline_limit=limit,
            store_url=self._store_url,
            ledger=self._ledger_url,
            heartbeat_seconds=run.policy.heartbeat_seconds,
            body=body,
            environment=self._environment,
            **self._worker_bounds,
        )
        envelope = await asyncio.to_thread(build) if large else build()
        if envelope.body_ref is not None:
            self._body_refs[f"{run.run_id}#{run.attempt}"] = envelope.body_ref
        text = (
            await asyncio.to_thread(payload_mod.encode_payload, envelope)
            if large
            else payload_mod.encode_payload(envelope)
        )
        job = JobSpec(
            run_id=run.run_id,
            task_id=run.task_id,
            attempt=run.attempt,
            payload=text,
            idempotency_key=run.idempotency_key,
            job_name=self.adapter.safe_name(
                f"wove-{run.task_id}-{run.run_id.rsplit(':', 1)[-1][:12]}-{run.attempt}"
            ),
            environment=self._environment,
            delivery=delivery,
            options=dict(run.extra.get("options") or {}),
        )
        if self.capabilities.array_jobs and job.idempotency_key is None:
            run.submission = await self._submit_batched(job)
        else:
            run.submission = await self.adapter.submit(job)

    async def _submit_batched(self, job: JobSpec) -> str:
        """Jobs submitted within ``array_window`` seconds of each other (a mapped task)
        go to the backend as one array job: one submission instead of N."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        self._batch.append((job, waiter))
        if len(self._batch) == 1:
            window = float(self._config.get("array_window", 0.05))
            loop.call_later(window, lambda: loop.create_task(self._flush_batch()))
        return await waiter

    async def _flush_batch(self) -> None:
        assert self.adapter is not None
        batch, self._batch = self._batch, []
        # A run cancelled while it waited for the window never reaches the backend.
        batch = [(job, waiter) for job, waiter in batch if not waiter.done()]
        if not batch:
            return
        jobs = [job for job, _ in batch]
        try:
            if len(jobs) == 1:
                handles = [await self.adapter.submit(jobs[0])]
            else:
                handles = await self.adapter.submit_many(jobs)
        except Exception as exc:
            for _, waiter in batch:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        self.stats["array_submissions"] += len(jobs) > 1
        self.stats["single_submissions"] += len(jobs) == 1
        strays = []
        for (_, waiter), handle in zip(batch, handles, strict=True):
            if not waiter.done():
                waiter.set_result(handle)
            else:  # cancelled while the submission was in flight: stop its job
                strays.append(handle)
        for handle in strays:
            with contextlib.suppress(Exception):
                await self.adapter.cancel(handle, running=True)

    def _sink(self, event: frames.WireEvent, raw: bytes) -> None:
        """A verified event, as a frame for the dispatcher. Unpickling runs on the shared
        loop and may run anything (a ``__reduce__`` that raises, or calls ``sys.exit``):
        ``event_frame`` turns that into the run's own error at once (the loop survives,
        the run is never dropped to wait out its delivery grace)."""
        from wove_adapters.core.executors.stdio import event_frame

        assert self._emit is not None
        frame = event_frame(event, where=f"{self.name} receiver")
        terminal = isinstance(event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled))
        if terminal and frame.get("type") == type(event).__struct_config__.tag:
            # The worker's signed event is what the ledger keeps (not when it became an
            # unpicklable-result error: that one the dispatcher signs itself).
            frame["_blob"] = raw
        self._emit(frame)

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        assert self.adapter is not None
        if run.submission is None:
            return
        await self.adapter.cancel(run.submission, running=True)
        if mode == "require_ack" and self.capabilities.confirm_cancel:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + run.policy.cancel_ack_timeout
            self._confirming[(run.run_id, run.attempt)] = (run, deadline)
            if self._confirmer is None or self._confirmer.done():
                self._confirmer = loop.create_task(self._confirm())

    async def _confirm(self) -> None:
        """The worker usually confirms with task_cancelled; if the backend killed it
        before it could, the backend's own CANCELLED state is the confirmation. One
        ``status_many`` per round for every run waiting for its confirmation (a hundred
        require_ack cancels are one request every 0.1 s, not a hundred)."""
        assert self.adapter is not None and self._emit is not None
        loop = asyncio.get_running_loop()
        while self._confirming:
            now = loop.time()
            for key, (run, deadline) in list(self._confirming.items()):
                if now >= deadline or not run.submission:
                    del self._confirming[key]
            waiting = dict(self._confirming)
            handles = {run.submission for run, _ in waiting.values() if run.submission}
            try:
                states = await self.adapter.status_many(sorted(handles))
            except Exception as exc:  # the next round asks again
                log.debug("%s: confirming cancels: status failed: %r", self.name, exc)
                states = {}
            for key, (run, _) in waiting.items():
                state = states.get(run.submission or "")
                if state is None:
                    continue
                if state in (JobState.CANCELLED, JobState.GONE):
                    self._emit(
                        frames.event(
                            frames.TASK_CANCELLED,
                            run.run_id,
                            run.task_id,
                            run.attempt,
                            reason=f"{self.name} reports the job {state.value}",
                        )
                    )
                if state.finished:
                    self._confirming.pop(key, None)
            if self._confirming:
                await asyncio.sleep(self.adapter.confirm_poll_seconds)

    async def status(self, run: RunAttempt) -> JobState:
        assert self.adapter is not None
        if run.submission is None:
            return JobState.UNKNOWN
        return await self._delivering(run, await self.adapter.status(run.submission))

    async def status_many(self, runs: Sequence[RunAttempt]) -> dict[str, JobState]:
        """One ``adapter.status_many`` for every run, then ``_delivering`` per run."""
        assert self.adapter is not None
        handles = sorted({run.submission for run in runs if run.submission is not None})
        found = await self.adapter.status_many(handles) if handles else {}
        states: dict[str, JobState] = {}
        for run in runs:
            if run.submission is None:
                states[run.run_id] = JobState.UNKNOWN
            elif (state := found.get(run.submission)) is not None:
                states[run.run_id] = await self._delivering(run, state)
        return states

    async def _delivering(self, run: RunAttempt, state: JobState) -> JobState:
        """The backend's view, with one correction: a job that ended normally while its
        terminal event has not arrived is still RUNNING while its worker may deliver it
        (the background outbox retries, see worker.sender). Then an outcome the worker
        recorded in the ledger resolves the run; only a job with no event and no record
        after the worker's whole retry window is reported finished (and so lost)."""
        if state is not JobState.SUCCEEDED or self.receiver is None:
            return state
        key = f"{run.run_id}#{run.attempt}"
        now = asyncio.get_running_loop().time()
        quiet = now - self._ended_quiet.setdefault(key, now)
        ledger_after, give_up_after = self._delivery_grace
        if quiet < ledger_after:  # the worker may still reach us itself
            return JobState.RUNNING
        if await self._resolve_from_ledger(run):
            self._ended_quiet.pop(key, None)
            return state
        if quiet < give_up_after:  # not recorded: its outbox may still be retrying
            return JobState.RUNNING
        return state

    async def _resolve_from_ledger(self, run: RunAttempt) -> bool:
        """Emit the outcome the worker recorded when it could not reach us, if any."""
        if not self._ledger_url or self._emit is None:
            return False
        from wove_adapters.core.codec import decode_outcome
        from wove_adapters.core.ledger import open_ledger

        try:
            record = await open_ledger(self._ledger_url).get(run.run_id)
            if record is None or record.outcome is None:
                return False
            frame = await asyncio.to_thread(decode_outcome, record.outcome, run.run_id)
        except Exception:  # unreadable: reconciliation reports the run lost
            return False
        if frame.get("attempt", run.attempt) != run.attempt:
            return False
        self._emit(frame)
        return True

    async def detach(self, run: RunAttempt) -> None:
        assert self.adapter is not None
        if run.submission is not None:
            await self.adapter.detach(run.submission)

    async def release(self, run: RunAttempt) -> None:
        self._ended_quiet.pop(f"{run.run_id}#{run.attempt}", None)
        if self.receiver is not None:
            self.receiver.unregister(run.run_id)
        if self.adapter is not None and run.submission is not None:
            with contextlib.suppress(Exception):
                await self.adapter.release(run.submission)
        ref = self._body_refs.pop(f"{run.run_id}#{run.attempt}", None)
        if ref is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(payload_mod.open_store(ref.store).delete, ref)

    async def drain(self) -> None:
        """See BackendAdapter.drain (the dispatcher calls it while stopping)."""
        if self.adapter is not None:
            await self.adapter.drain()

    async def aclose(self) -> None:
        if self._confirmer is not None:
            self._confirmer.cancel()
            with contextlib.suppress(BaseException):
                await self._confirmer
            self._confirmer = None
        self._confirming.clear()
        if self.adapter is not None:
            await self.adapter.aclose()


def worker_bounds(config: dict[str, Any]) -> dict[str, Any]:
    """How long workers keep trying to hand an outcome back (see worker.sender), from
    ``executor_config``; a bad value fails at start-up, naming the key."""
    bounds: dict[str, Any] = {}
    for key, field_name, kind in (
        ("worker_retry_seconds", "retry_seconds", float),
        ("worker_retry_attempts", "retry_attempts", int),
        ("worker_exit_flush_seconds", "exit_flush_seconds", float),
    ):
        value = config.get(key)
        if value is None:
            continue
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = -1
        if number < 0 or isinstance(value, bool):
            raise ValueError(
                f"executor_config {key!r} must be a number >= 0, not {value!r}"
            )
        bounds[field_name] = number
    return bounds


def delivery_grace(bounds: dict[str, Any], after_job: str = "retries") -> tuple[float, float]:
    """How long a job that ended without its terminal event still counts as delivering:
    ``(look in the ledger after, give up after)`` seconds, from the workers' bounds
    (``worker_exit_flush_seconds``, ``worker_retry_seconds``; defaults: this process's,
    see worker.sender) and what the adapter's workers do after a job (``after_job``),
    plus a little for the last try in flight."""
    from wove_adapters.worker import sender

    if after_job == "flushed":
        return 0.0, 0.0
    flush = float(bounds.get("exit_flush_seconds", sender.EXIT_FLUSH_SECONDS)) + 2.0
    if after_job == "settled":
        return flush, flush
    retry = float(bounds.get("retry_seconds", sender.RETRY_SECONDS)) + 5.0
    return flush, max(retry, flush)


def native_only(cls: type[BackendAdapter], config: dict[str, Any]) -> bool:
    """Adapters with a native result path may skip the receiver when configured so."""
    return cls.capabilities.native_result and config.get("return_path") == "native"
