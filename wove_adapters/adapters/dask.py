"""``dask``: tasks run on a Dask cluster (``distributed``), one Dask task per attempt.

The adapter talks to the scheduler with Dask's asynchronous ``Client`` on the shared loop,
created once per environment; it never blocks the loop. ``executor_config["address"]``
names a running scheduler, or ``cluster: "local"`` starts a ``LocalCluster`` (worker
processes, loopback only, no dashboard) that the environment owns and stops.

What runs on a worker is ``run_dask(payload)`` from ``worker.hosted``: Dask imports it
by reference, so a plain ``dask worker`` with wove-adapters installed is the whole worker
side. It verifies the signed payload before anything is unpickled, then either

- ``return_path: "http"`` (default) / ``"redis"``: runs it with ``worker.runner.run``,
  which reports ``task_started``, heartbeats and the terminal event to the caller, or
- ``return_path: "native"``: runs it and returns the value (raises the task's exception),
  so the Dask future itself carries the outcome and the adapter emits the events.

Either way the Dask future is watched: an error of the wrapper itself, a cancellation, a
dead worker (``KilledWorker``) and a refused payload (the worker signs and sends nothing
for a payload that does not verify; its future fails with ``PayloadRefused``: the run's
PayloadError names the key, never requeued) become events, so no run waits on a
reconciliation tick.

Dask keys are the run's identity: the sanitised idempotency key when there is one (Dask
deduplicates by key: the same key twice is one execution), otherwise a key unique to the
run and attempt. This module must not import dask or distributed at import time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from wove_adapters.adapters import dask_cluster
from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.callbacks.inbox import Watched, failure_frame, refusal_frame
from wove_adapters.core import frames
from wove_adapters.core.aio import BatchedFetch, IterationBatch, group_by, wait_within
from wove_adapters.core.doctor import Row
from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, FinishedStates, JobState
from wove_adapters.worker import hosted

log = logging.getLogger("wove_adapters.adapters.dask")

# Runs in flight (these included) from which a batch's short runs return their signed
# outcomes in their futures instead of POSTing them (``_flush``).
RETURNED_IN_FLIGHT = 4
# Values to fetch (returned outcomes, native results) that finish within this many
# seconds of each other share one gather:
# a gather costs the scheduler and a worker a round trip each, whatever it carries, and
# a burst's results finish one by one (one loop iteration each).
GATHER_WINDOW = 0.02
# Per-task options Dask's ``Client.submit`` understands, passed through as given.
SUBMIT_OPTIONS = ("resources", "priority", "retries", "workers", "allow_other_workers")


def check_workers(client: Any) -> Any:
    """Check that a cluster's workers can run payloads: ``{worker: version}``.

    Nothing needs registering on Dask (functions travel by reference, so a plain
    ``dask worker`` with wove-adapters installed runs payloads); this fails with the
    worker's ImportError when one lacks it. Sync client: the dict; async: awaitable."""
    return client.run(hosted.worker_ready)


@dataclass
class _Tracked(Watched):
    future: Any = None  # None while its batch has not left
    watcher: asyncio.Task[None] | None = None
    detached: bool = False  # detached before its batch left: submitted, then let go
    returned: bool = False  # a short run's signed outcome comes back as the future's value


class DaskOptions(AdapterOptions, kw_only=True):
    """``executor_config`` of ``dask`` (docs/adapters/dask.md)."""

    address: str | None = None
    scheduler_file: str | None = None
    cluster: str | None = None  # "local": a LocalCluster owned by the environment
    n_workers: int = 2
    threads_per_worker: int = 1
    cluster_options: dict[str, Any] = {}
    allowed_failures: int | None = None
    connect_timeout: float = 30.0
    client_options: dict[str, Any] = {}
    close_timeout: float = 45.0
    cancel_force: bool = False
    # Client.submit options for every task (SUBMIT_OPTIONS).
    resources: dict[str, Any] | None = None
    priority: int | None = None
    retries: int | None = None
    workers: Any = None  # addresses or names: a string or a list
    allow_other_workers: bool | None = None


# Dask states, both views of a task.
_STATES: dict[str, JobState] = {
    # client-side Future.status
    "PENDING": JobState.PENDING,
    "FINISHED": JobState.SUCCEEDED,
    "ERROR": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "LOST": JobState.GONE,
    # scheduler TaskState.state
    "RELEASED": JobState.PENDING,
    "WAITING": JobState.PENDING,
    "QUEUED": JobState.PENDING,
    "NO-WORKER": JobState.PENDING,
    "PROCESSING": JobState.RUNNING,
    "MEMORY": JobState.SUCCEEDED,
    "ERRED": JobState.FAILED,
    "FORGOTTEN": JobState.GONE,
}


class DaskAdapter(BackendAdapter):
    name = "dask"
    config_struct = DaskOptions
    required_modules = ("dask", "distributed")
    capabilities = Capabilities.backend(
        # A running task is a Python thread inside the worker: Dask forgets it and drops its
        # result, but the thread runs to its end. Not a real stop, so not claimed.
        cancel_running=False,
        confirm_cancel=False,
        native_idempotency=True,
        native_result=True,
        detach=True,  # fire_and_forget keeps the task alive without this client
        inline_payload_limit=4 * 1024 * 1024,
        chunks=True,
    )
    STATE_MAP: ClassVar[dict[str, JobState]] = _STATES

    options: DaskOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        super().__init__(config, environment=environment)
        self.client: Any = None
        self.cluster: Any = None
        if self.native:  # the future carries the outcome only: no started/heartbeat events
            self.capabilities = dataclasses.replace(  # type: ignore[misc]
                type(self).capabilities, heartbeats=False)
        self._tracked: dict[str, _Tracked] = {}
        self._finished: FinishedStates[JobState] = FinishedStates()
        self._defaults = {k: config[k] for k in SUBMIT_OPTIONS if config.get(k) is not None}
        # One ``client.map`` for a loop iteration's submits (one graph update, not one per
        # task), one ``gather`` for the results that finished together.
        self._batch: IterationBatch[tuple[str, str, dict[str, Any]]] = IterationBatch(self._flush)
        self._results: BatchedFetch[Any, Any] = BatchedFetch(
            lambda futures: self.client.gather(futures), _awaited)
        self._detached: dict[str, Any] = {}
        # The transport's check of events a worker returned signed (``attach_signed``);
        # None: every outcome comes by the return path the envelope names.
        self._accept: Callable[[bytes], JobState] | None = None
        self._gate: asyncio.Future[None] | None = None
        # Runs whose value will be fetched (native, or sent with returned=True) and whose
        # futures have not ended yet.
        self._returning = 0

    def attach_signed(self, accept: Callable[[bytes], JobState]) -> None:
        """On the http return path: a run that ends within the short-task window
        returns its signed terminal event as the future's value
        (``hosted.run_returned``) and ``accept`` checks and routes it, so a short run
        costs no HTTP request from the worker."""
        self._accept = accept

    # ---------------------------------------------------------- life cycle

    async def start(self) -> None:
        self.client, self.cluster = await dask_cluster.connect(self.options, self.environment)

    async def aclose(self) -> None:
        """Stop in the order that keeps the cluster quiet: detached runs on our own
        cluster finish first (they cannot outlive it), then our watchers stop, then the
        client closes (releasing every key, so no worker holds data or runs our work
        when it is told to stop), and only then the LocalCluster."""
        await self._finish_detached()
        for tracked in list(self._tracked.values()):
            if tracked.watcher is not None:
                tracked.watcher.cancel()
        self._tracked.clear()
        await self._results.aclose()
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        await dask_cluster.close(client, cluster)

    async def drain(self) -> None:
        """Before the dispatcher stops writing its ledger: detached runs on our own
        cluster finish (their outcomes still reach the ledger through the dispatcher)."""
        await self._finish_detached()

    async def _finish_detached(self) -> None:
        """A detached run on the LocalCluster we own would die with it, its ledger row
        left ``detached`` for good: wait for those runs (their workers record the outcome
        in the ledger), up to ``executor_config["close_timeout"]`` seconds (default 45, inside
        the 60 s the shared loop gives dispatchers at exit)."""
        pending = [f for f in self._detached.values() if not f.done()]
        self._detached.clear()
        if not pending or self.client is None:
            return
        timeout = self.options.close_timeout
        left = await wait_within([f.exception() for f in pending], timeout)
        if left:
            log.warning(
                "%d detached Dask runs were still running when the environment closed "
                "after close_timeout=%ss; the LocalCluster stops them, so their ledger rows "
                "stay 'detached'. Use a separate scheduler ('address') for runs that must "
                "outlive the caller.", left, timeout,
            )

    # ---------------------------------------------------------- the primitives

    def dask_key(self, job: JobSpec) -> str:
        """The sanitised idempotency key (one Dask task per key and attempt), else a key
        unique to the run and attempt."""
        if job.idempotency_key is not None:
            suffix = "" if job.attempt == 1 else f"-a{job.attempt}"
            return self.safe_name(f"wove-key-{job.idempotency_key}") + suffix
        return self.safe_name(f"wove-{job.task_id}-{job.run_id.rsplit(':', 1)[-1]}-{job.attempt}")

    async def submit(self, job: JobSpec) -> str:
        """Queue the job for this loop iteration's batch (one ``client.map``)."""
        key = self.dask_key(job)
        options = {**self._defaults,
                   **{k: v for k, v in job.options.items() if k in SUBMIT_OPTIONS}}
        self._tracked[key] = _Tracked(job.run_id, job.task_id, job.attempt)
        self._finished.forget(key)
        self._batch.add((key, job.payload, options))
        return key

    def _flush(self, batch: list[tuple[str, str, dict[str, Any]]]) -> None:
        leaving = [item for item in batch if item[0] in self._tracked]  # not cancelled
        loop = asyncio.get_running_loop()
        # Outcomes in the futures only while several runs are in flight: their results
        # are fetched with one gather per loop iteration, cheaper than a POST each. A
        # run alone (a caller waiting on each result in turn) is faster by POST: the
        # worker reaches the caller straight away, where a gather goes through the
        # scheduler after it heard of the end (see docs/adapters/dask.md, "Numbers").
        # Asked only when true: a worker whose run_dask predates the argument still runs
        # payloads of a caller that does not take outcomes from the future.
        returned = ({"returned": True} if self._accept is not None
                    and len(self._tracked) >= RETURNED_IN_FLIGHT else {})
        for items in group_by(leaving, lambda item: repr(sorted(item[2].items()))):
            keys = [key for key, _, _ in items]
            try:
                futures = self.client.map(hosted.run_dask, [p for _, p, _ in items], key=keys,
                                          pure=False, **items[0][2], **returned)
            except Exception as exc:  # every run in the batch hears of it
                for key in keys:
                    tracked = self._tracked.pop(key, None)
                    if tracked is not None:
                        self.report(frames.error_event(tracked.run_id, tracked.task_id, exc,
                                                       attempt=tracked.attempt, source="transport",
                                                       retryable=True))
                continue
            for key, future in zip(keys, futures, strict=True):
                tracked = self._tracked[key]
                tracked.future = future
                tracked.returned = bool(returned)
                if tracked.detached:
                    del self._tracked[key]
                    self._let_go(key, future)
                    continue
                self._returning += self.native or tracked.returned  # its watcher counts down
                tracked.watcher = loop.create_task(self._watch(key, tracked))

    async def cancel(self, handle: str, *, running: bool = True) -> None:
        tracked = self._tracked.get(handle)
        if tracked is None:
            return
        if tracked.future is None:  # still in this iteration's batch: it never leaves
            del self._tracked[handle]
            self._finished.remember(handle, JobState.CANCELLED)
            return
        if tracked.future.done():
            return
        await self.client.cancel([tracked.future], force=self.options.cancel_force,
                                 reason="cancelled by wove-adapters")

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """The client's own view first (the scheduler tells it of errors, losses and
        cancels); keys it still holds as pending: one scheduler request for all."""
        states: dict[str, JobState] = {}
        pending: list[str] = []
        for handle in handles:
            tracked = self._tracked.get(handle)
            if tracked is None:
                states[handle] = self._finished.get(handle, JobState.GONE)
            elif tracked.future is None:
                states[handle] = JobState.PENDING
            elif tracked.future.status == "error":
                # Its watcher is reading the error (a task's, ours, or a refusal) and
                # reports it in a moment: not a failure without an event to act on.
                states[handle] = JobState.RUNNING
            elif (local := self.map_state(tracked.future.status)) is not JobState.PENDING:
                states[handle] = local
            else:
                pending.append(handle)
        if pending:
            # Running or still queued; a key the scheduler dropped reaches the client as
            # "lost"/"cancelled" on its own, so a missing entry is only not-yet-seen.
            found = await self.client.scheduler.get_task_status(keys=pending)
            for handle in pending:
                states[handle] = self.map_state(found.get(handle))
        return states

    async def detach(self, handle: str) -> None:
        """Keep the task alive after this client lets go; the worker records the outcome
        in the ledger (both return paths do, for ``detach`` runs)."""
        tracked = self._tracked.get(handle)
        if tracked is None:
            return
        if tracked.future is None:  # still in this iteration's batch: it leaves, then
            tracked.detached = True  # _flush lets it go (a detached run still runs)
            return
        del self._tracked[handle]
        if not tracked.future.done():
            self._let_go(handle, tracked.future)
        if tracked.watcher is not None:
            tracked.watcher.cancel()

    def _let_go(self, key: str, future: Any) -> None:
        """A detached run's future: on a cluster we own, kept so aclose() can wait for it
        (it cannot outlive the cluster); elsewhere handed to the scheduler for good."""
        from distributed import fire_and_forget

        if self.cluster is not None:
            self._detached[key] = future
        else:
            fire_and_forget(future)

    # ---------------------------------------------------------- the future as a return path

    async def _watch(self, key: str, tracked: _Tracked) -> None:
        future = tracked.future
        value: Any = None
        remote_tb = ""
        try:
            try:
                exc = await future.exception()
            finally:
                if self.native or tracked.returned:  # no longer to come (_gather_window)
                    self._returning -= 1
            status = future.status
            if status == "error" and self.native and exc is not None:
                remote_tb = _format_remote(exc, await future.traceback())
            if status == "finished" and (self.native or tracked.returned):
                await asyncio.shield(self._gather_window())
                try:
                    value = await self._results.fetch(future)
                except Exception as gather_error:  # result lost in transit
                    exc, status = gather_error, "lost"
        except asyncio.CancelledError:
            if self._tracked.get(key) is tracked:  # closing, not a Dask cancellation
                raise
            return
        except Exception as watch_error:  # the comm to the scheduler broke
            exc, status = watch_error, "lost"
        if self._tracked.get(key) is tracked:
            del self._tracked[key]
        if isinstance(exc, hosted.PayloadRefused):  # the worker signed and sent nothing
            self._finished.remember(key, JobState.REFUSED)
            frame: dict[str, Any] | None = refusal_frame(self.name, tracked, self.config)
        elif isinstance(value, bytes) and tracked.returned:
            frame = self._returned(key, tracked, value)
        else:
            self._finished.remember(key, self.map_state(status))
            frame = _frame_for(tracked, status, value, exc, native=self.native,
                               remote_tb=remote_tb)
        self.report(frame)

    def _gather_window(self) -> asyncio.Future[None]:
        """Opens when ``GATHER_WINDOW`` has passed since the first value to fetch that
        waits for it, or at once when no other value is still to come (a run alone and
        the last runs of a mapped call wait for nothing): the watchers it lets through
        fetch in one loop iteration, so ``_results`` fetches all their values with one
        gather."""
        if self._gate is None or self._gate.done():
            loop = asyncio.get_running_loop()
            gate: asyncio.Future[None] = loop.create_future()
            loop.call_later(GATHER_WINDOW, _open, gate)
            self._gate = gate
        if self._returning <= 0:
            _open(self._gate)
        return self._gate

    def _returned(self, key: str, tracked: _Tracked, value: bytes) -> dict[str, Any] | None:
        """A short run's signed events, returned in the future: checked, then routed as
        the receiver would route them; events that do not verify leave the run lost (its
        orphan policy applies), nothing in them unpickled."""
        assert self._accept is not None
        try:
            ended = self._accept(value)
        except Exception as exc:
            self._finished.remember(key, JobState.GONE)
            return frames.event_of(tracked, frames.TASK_LOST, reason=(
                f"the outcome the Dask task returned did not verify ({type(exc).__name__}: "
                f"{exc})"))
        self._finished.remember(key, ended)
        return None

    async def doctor(self) -> list[Row]:
        return await dask_cluster.doctor_rows(self.client)


def _frame_for(
    tracked: _Tracked,
    status: str | None,
    value: Any,
    exc: BaseException | None,
    *,
    native: bool,
    remote_tb: str = "",
) -> dict[str, Any] | None:
    """The event a finished Dask future means for its run (None: the worker reported)."""
    if status == "finished":
        if not native:
            return None  # the worker already reported (and was acknowledged)
        return frames.event_of(tracked, frames.TASK_RESULT, result=value)
    if status == "cancelled":
        return frames.event_of(tracked, frames.TASK_CANCELLED, reason="the Dask task was cancelled")
    if status == "error" and exc is not None and not _lost(exc):
        return failure_frame(tracked, exc, native=native, remote_tb=remote_tb)
    reason = f"{type(exc).__name__}: {exc}" if exc is not None else f"Dask reports {status}"
    return frames.event_of(tracked, frames.TASK_LOST, reason=f"the Dask task was lost ({reason})")


def _open(gate: asyncio.Future[None]) -> None:
    if not gate.done():
        gate.set_result(None)


async def _awaited(future: Any) -> Any:
    return await future


def _format_remote(exc: BaseException, tb: Any) -> str:
    """The worker's traceback (Dask ships it beside the exception) as text, without the
    payload runner's own frames."""
    import traceback

    from wove_adapters.worker import runner as worker

    own = {__file__, hosted.__file__, worker.__file__}
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in own:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _lost(exc: BaseException) -> bool:
    from distributed import KilledWorker

    return isinstance(exc, (KilledWorker, hosted.OutcomeUndelivered))
