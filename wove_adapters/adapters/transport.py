"""The transport that drives any ``BackendAdapter``: the machinery every adapter shares.

Signed payloads and the payload store, the return path (receiver or drop box), array
batching, chunks, require_ack confirmation, reconciliation through one ``status_many`` per
tick, and following another caller's job that holds the same idempotency key
(``followers.KeyFollowers``). What comes back (events, results by reference, outcomes the
worker recorded) is the caller's way back, ``callbacks.inbox``. An adapter only talks to
its backend (``base.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from wove_adapters.adapters.base import BackendAdapter, Following, JobSpec
from wove_adapters.adapters.followers import KeyFollowers
from wove_adapters.callbacks.dropbox import DropboxReader, get_dropbox
from wove_adapters.callbacks.inbox import Inbox, delivery_grace, worker_bounds
from wove_adapters.callbacks.receiver import CallbackReceiver, get_receiver
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames
from wove_adapters.core.doctor import Row
from wove_adapters.core.policies import JobState
from wove_adapters.core.transport import Emit, RunAttempt, StartContext, Transport

log = logging.getLogger("wove_adapters.adapters")


@dataclass
class _Chunk:
    """One backend job carrying several runs (``submit_chunk``): ``live`` are the runs not
    yet cancelled, ``held`` those not yet released, ``started`` those the worker said
    started (a cancel can no longer keep them from running)."""

    name: str
    live: set[str]
    held: set[str] = field(default_factory=set)
    started: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.held = set(self.live)


class AdapterTransport(Transport):
    """Turns any BackendAdapter into a transport: payloads out, receiver events in."""

    def __init__(self, adapter_cls: type[BackendAdapter]) -> None:
        self.adapter_cls = adapter_cls
        self.name = adapter_cls.name
        self.capabilities = adapter_cls.capabilities
        self.reconcile_seconds = adapter_cls.reconcile_seconds
        self.adapter: BackendAdapter | None = None
        self.receiver: CallbackReceiver | None = None
        # The receiver when it is the Redis drop box (return_path "redis"), else None.
        self._dropbox: DropboxReader | None = None
        self._emit: Emit | None = None
        self._key_id = ""
        self._ledger_url: str | None = None
        self._store_url: str | None = None
        self._environment = ""
        self._body_refs: dict[str, payload_mod.BodyRef] = {}
        self.inbox: Inbox | None = None  # what comes back (callbacks.inbox), from start()
        self._batch: list[tuple[JobSpec, asyncio.Future[str]]] = []
        self._worker_bounds: dict[str, Any] = {}
        # require_ack cancels waiting for the backend to confirm: (run id, attempt) ->
        # (the attempt, deadline); one task polls them all (_confirm).
        self._confirming: dict[tuple[str, int], tuple[RunAttempt, float]] = {}
        self._confirmer: asyncio.Task[None] | None = None
        self.followers: KeyFollowers | None = None
        self.stats: dict[str, int] = {
            "array_submissions": 0, "single_submissions": 0, "chunk_submissions": 0,
            "chunked_runs": 0,
        }
        self._chunks: dict[str, _Chunk] = {}  # by run id, for each run a chunk carries

    async def start(self, context: StartContext) -> None:
        # Before the receiver binds or the backend is contacted: a typo fails here.
        context.check_options(self.adapter_cls.config_struct, self.name)
        environment, executor_config, emit = (
            context.environment, context.executor_config, context.emit
        )
        self._emit = emit
        self._environment = environment
        self._key_id = executor_config["_key_id"]
        self._ledger_url = executor_config.get("_ledger_url")
        # Built (not started) first: its options, parsed once, are the transport's too.
        self.adapter = adapter = self.adapter_cls(executor_config, environment=environment)
        adapter.emit = emit
        options = adapter.options
        self._store_url = options.payload_store
        self._worker_bounds = worker_bounds(executor_config)
        if options.return_path == "redis":
            self.receiver = self._dropbox = await get_dropbox(options.return_redis_url)
        elif not adapter.native:
            self.receiver = await get_receiver(executor_config, environment=environment)
        self.inbox = Inbox(
            self.name, emit, key_id=self._key_id, receiver=self.receiver,
            ledger_url=self._ledger_url, store_url=self._store_url,
            grace=delivery_grace(self._worker_bounds, self.adapter_cls.after_job),
            outcomes=self.adapter.outcomes, on_started=self._chunk_started,
        )
        # An adapter whose backend can carry a worker's signed events back in its own
        # result (Ray's ObjectRef, Dask's future) takes them to ``Inbox.accept_signed``,
        # on the http return path (where the receiver that checks them lives).
        attach = getattr(self.adapter, "attach_signed", None)
        if callable(attach) and self.receiver is not None and self._dropbox is None:
            attach(self.inbox.accept_signed)
        await self.adapter.start()
        self.followers = KeyFollowers(self.adapter, emit, self._key_id)
        # Chunks need the http receiver: its answers tell a chunk which of its runs were
        # cancelled (a drop box answers nothing; a native path has one result per job).
        self.supports_chunks = (
            self.adapter.capabilities.chunks and self.receiver is not None
            and self._dropbox is None
        )
        # An adapter may refine its capabilities from its configuration.
        self.capabilities = self.adapter.capabilities

    def return_path(self, run: RunAttempt) -> payload_mod.ReturnPath:
        assert self.adapter is not None
        if self.adapter.native:  # the adapter emits the outcome the backend hands back
            return payload_mod.ReturnPath(kind="native")
        assert self.receiver is not None
        if self._dropbox is not None:
            return payload_mod.ReturnPath(
                kind="redis", url=self._dropbox.redis_url, key=self._dropbox.key
            )
        return payload_mod.ReturnPath(kind="http", url=self.receiver.url)

    async def submit(self, run: RunAttempt) -> None:
        assert self.adapter is not None
        job = await self._job_for(run)
        if self.capabilities.array_jobs and job.idempotency_key is None:
            run.submission = await self._submit_batched(job)
        else:
            handle = await self.adapter.submit(job)
            run.submission = str(handle)
            if isinstance(handle, Following):
                assert self.followers is not None
                self.followers.add(run, run.submission)

    async def submit_chunk(self, runs: Sequence[RunAttempt]) -> None:
        """One backend job for several runs (see ``worker.chunks``): each run's payload is
        signed on its own; the job's handle is every run's submission, and the job is
        cancelled or released only with its last live run."""
        assert self.adapter is not None
        if len(runs) == 1 or not self.supports_chunks:
            await super().submit_chunk(runs)
            return
        chunk = f"{runs[0].run_id}~{len(runs)}"
        jobs = [await self._job_for(run, chunk=chunk) for run in runs]
        first = jobs[0]
        job = JobSpec(
            run_id=chunk,
            task_id=first.task_id,
            attempt=1,
            payload=payload_mod.encode_chunk([j.payload for j in jobs]),
            idempotency_key=None,
            job_name=self.adapter.safe_name(
                f"wove-{first.task_id}-{runs[0].run_id.rsplit(':', 1)[-1][:12]}-x{len(runs)}"
            ),
            environment=self._environment,
            delivery=first.delivery,
            options=first.options,
        )
        try:
            handle = str(await self.adapter.submit(job))
        except BaseException:
            if self.receiver is not None:
                for run in runs:
                    self.receiver.unregister(run.run_id)
                self.receiver.forget_chunk(chunk)
            raise
        carried = _Chunk(chunk, {run.run_id for run in runs})
        for run in runs:
            run.submission = handle
            self._chunks[run.run_id] = carried
        self.stats["chunk_submissions"] += 1
        self.stats["chunked_runs"] += len(runs)

    async def _job_for(self, run: RunAttempt, *, chunk: str | None = None) -> JobSpec:
        """The run's signed payload as a job, its receiver registration made."""
        assert self.adapter is not None
        delivery = run.policy.as_delivery(run.idempotency_key)
        if self.receiver is not None:
            assert self.inbox is not None
            self.receiver.register(run.run_id, self.inbox.sink, key_id=self._key_id,
                                   chunk=chunk)
        limit = self.adapter.options.inline_payload_limit or self.capabilities.inline_payload_limit
        body = run.extra.get("body")
        if body is None:
            body = payload_mod.task_body(run.func, run.args)  # small: cheaper than a thread hop
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
            trace=run.extra.get("trace"),
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
        return JobSpec(
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

    async def _submit_batched(self, job: JobSpec) -> str:
        """Jobs submitted within ``array_window`` seconds of each other (a mapped task)
        go to the backend as one array job: one submission instead of N."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[str] = loop.create_future()
        self._batch.append((job, waiter))
        if len(self._batch) == 1:
            assert self.adapter is not None
            window = self.adapter.options.array_window
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

    def _chunk_started(self, run_id: str) -> None:
        chunk = self._chunks.get(run_id)
        if chunk is not None:
            chunk.started.add(run_id)

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        assert self.adapter is not None
        if run.submission is None:
            return
        if self.followers is not None and self.followers.follows(run):
            self.followers.cancelled(
                run, f"stopped following {self.name} job {run.submission}, which another "
                     f"caller owns (it goes on for them)",
            )
            return
        chunk = self._chunks.get(run.run_id)
        if chunk is not None and self._cancel_in_chunk(run, chunk, mode):
            return
        await self.adapter.cancel(run.submission, running=True)
        if mode == "require_ack" and self.capabilities.confirm_cancel:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + run.policy.cancel_ack_timeout
            self._confirming[(run.run_id, run.attempt)] = (run, deadline)
            if self._confirmer is None or self._confirmer.done():
                self._confirmer = loop.create_task(self._confirm())

    def _cancel_in_chunk(self, run: RunAttempt, chunk: _Chunk, mode: str) -> bool:
        """Cancel one run of a chunk whose other runs go on: the worker is told (in the
        receiver's answers) not to start it, and a run it has not said it started is
        confirmed cancelled at once. One that started runs to its end, which is what
        confirms a ``require_ack`` cancel. False: it was the chunk's last live run, so
        the whole job is cancelled as a single run's would be."""
        chunk.live.discard(run.run_id)
        if not chunk.live:
            return False
        assert self._emit is not None
        if self.receiver is not None:
            self.receiver.skip_in_chunk(chunk.name, run.run_id)
        if run.run_id not in chunk.started:
            self._emit(frames.event_of(
                run, frames.TASK_CANCELLED,
                reason=f"cancelled inside {self.name} job {run.submission} before it started",
            ))
        return True

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
                        frames.event_of(
                            run, frames.TASK_CANCELLED,
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
        return (await self.status_many([run]))[run.run_id]

    async def status_many(self, runs: Sequence[RunAttempt]) -> dict[str, JobState]:
        """One ``adapter.status_many`` for every run, then the inbox's verdicts."""
        assert self.adapter is not None and self.inbox is not None
        handles = sorted({run.submission for run in runs if run.submission is not None})
        found = await self.adapter.status_many(handles) if handles else {}
        states: dict[str, JobState] = {}
        ours: list[tuple[RunAttempt, JobState]] = []
        for run in runs:
            if run.submission is None:
                states[run.run_id] = JobState.UNKNOWN
            elif (state := found.get(run.submission)) is None:
                continue
            elif (state is not JobState.REFUSED and self.followers is not None
                  and self.followers.follows(run)):
                # The owner's outcome is the follower's to hand over: a finished job is
                # not a lost run (its outcome may be a poll away); anything else is as
                # the backend says, and the run's orphan policy applies.
                states[run.run_id] = JobState.RUNNING if state is JobState.SUCCEEDED else state
            else:
                ours.append((run, state))
        states.update(await self.inbox.verdicts(ours))
        return states

    async def waiting_reasons(self, runs: Sequence[RunAttempt]) -> dict[str, str]:
        assert self.adapter is not None
        by_handle = {run.submission: run.run_id for run in runs if run.submission is not None}
        found = await self.adapter.waiting_reasons(sorted(by_handle)) if by_handle else {}
        return {by_handle[handle]: why for handle, why in found.items() if handle in by_handle}

    async def detach(self, run: RunAttempt) -> None:
        assert self.adapter is not None
        if self.followers is not None and self.followers.stop(run):
            return  # the job is another caller's: nothing of ours to let go of
        if run.submission is not None:
            await self.adapter.detach(run.submission)

    async def release(self, run: RunAttempt) -> None:
        others = self.followers is not None and self.followers.forget(run)
        if self.receiver is not None:
            self.receiver.unregister(run.run_id)
        chunk = self._chunks.pop(run.run_id, None)
        if chunk is not None:
            chunk.live.discard(run.run_id)
            chunk.held.discard(run.run_id)
            if chunk.held:
                others = True  # its job still carries other runs
            elif self.receiver is not None:
                self.receiver.forget_chunk(chunk.name)
        if self.adapter is not None and run.submission is not None and not others:
            with contextlib.suppress(Exception):
                await self.adapter.release(run.submission)
        if self.inbox is not None:
            await self.inbox.release(run, self._body_refs.pop(f"{run.run_id}#{run.attempt}", None))

    async def doctor(self) -> list[Row]:
        """The adapter's checks of its backend, then the return path's (``Inbox``)."""
        assert self.adapter is not None and self.inbox is not None
        rows = await self.adapter.doctor()
        try:
            hosts = await self.adapter.worker_hosts()
        except Exception:  # the adapter's own rows say why
            hosts = None
        return rows + await self.inbox.doctor_rows(hosts)

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
        if self.inbox is not None:
            await self.inbox.aclose()
        if self.followers is not None:
            await self.followers.aclose()
        if self.adapter is not None:
            await self.adapter.aclose()
