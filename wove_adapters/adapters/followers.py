"""Following another caller's job that holds the same idempotency key: every adapter
without native dedupe attaches a second caller's run to the first one's job this way
(see ``transport.AdapterTransport``, which owns one ``KeyFollowers``)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from wove_adapters.adapters.base import BackendAdapter
from wove_adapters.core import frames
from wove_adapters.core.policies import JobState
from wove_adapters.core.transport import Emit, RunAttempt

log = logging.getLogger("wove_adapters.adapters")


class KeyFollowers:
    """Runs whose ``submit`` found another caller's job holding their idempotency key.

    One task polls the adapter's ``outcomes`` for every followed job (fast at first, then
    every ``poll_max`` seconds) and hands each finished job's verified outcome to every run
    that follows it, re-addressed to that run. A followed job that is cancelled cancels
    its followers; one that dies without an outcome is found by reconciliation (the
    transport reports it as the backend does) and the run's orphan policy applies.
    """

    poll_first = 0.02
    poll_max = 0.5
    # How often (seconds) the poller also asks whether a followed job was cancelled.
    status_every = 1.0

    def __init__(self, adapter: BackendAdapter, emit: Emit, key_id: str) -> None:
        self.adapter = adapter
        self.emit = emit
        self.key_id = key_id  # the key an outcome must be signed with (signing.accepts)
        # Runs waiting for their followed job's outcome, and every run that follows
        # another caller's job until it is released (whose job handle is not ours).
        self.runs: dict[tuple[str, int], tuple[RunAttempt, str]] = {}
        self.others: set[tuple[str, int]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._delay = self.poll_first

    def follows(self, run: RunAttempt) -> bool:
        return (run.run_id, run.attempt) in self.others

    def add(self, run: RunAttempt, handle: str) -> None:
        self.runs[(run.run_id, run.attempt)] = (run, handle)
        self.others.add((run.run_id, run.attempt))
        self._delay = self.poll_first
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def stop(self, run: RunAttempt) -> bool:
        """Stop following for ``run``; False if it was not followed."""
        return self.runs.pop((run.run_id, run.attempt), None) is not None

    def forget(self, run: RunAttempt) -> bool:
        """The run ended: True if its job was another caller's."""
        self.stop(run)
        key = (run.run_id, run.attempt)
        found = key in self.others
        self.others.discard(key)
        return found

    def cancelled(self, run: RunAttempt, reason: str) -> None:
        """End ``run`` as cancelled and stop following for it: on this run's own cancel
        (the job is another caller's, so it goes on; confirmed once the caller's cancel
        call has returned), or when the followed job was cancelled."""
        if self.stop(run):
            asyncio.get_running_loop().call_soon(self.emit, frames.event_of(
                run, frames.TASK_CANCELLED, reason=reason,
            ))

    async def aclose(self) -> None:
        self.runs.clear()
        self.others.clear()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(BaseException):
                await self._poller
            self._poller = None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while self.runs:
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 1.5, self.poll_max)
            handles = sorted({handle for _, handle in self.runs.values()})
            try:
                found = await self.adapter.outcomes(handles) if handles else {}
            except Exception as exc:  # the next round asks again; reconciliation watches
                log.debug("%s: following: outcomes failed: %r", self.adapter.name, exc)
                found = {}
            for handle, outcome in found.items():
                await self._deliver(handle, outcome)
            if self.runs and loop.time() - checked >= self.status_every:
                checked = loop.time()
                await self._check_cancelled()

    async def _deliver(self, handle: str, outcome: bytes | Exception) -> None:
        """Each following run checks the outcome against its own key and task before
        anything in it is unpickled (a backend writer cannot hand it another's)."""
        from wove_adapters.core.codec import decode_outcome

        for key, (run, followed) in list(self.runs.items()):
            if followed != handle:
                continue
            del self.runs[key]
            error = outcome if isinstance(outcome, Exception) else None
            if error is None:
                assert isinstance(outcome, bytes)
                try:
                    frame = await asyncio.to_thread(functools.partial(
                        decode_outcome, outcome, key_id=self.key_id,
                        idempotency_key=run.idempotency_key, task_id=run.task_id,
                    ))
                except Exception as exc:  # a record that does not verify is this run's error
                    error = exc
                else:
                    self.emit({**frame, "run_id": run.run_id, "task_id": run.task_id,
                               "attempt": run.attempt})
                    continue
            self.emit(frames.error_event(run.run_id, run.task_id, error,
                                         attempt=run.attempt, source="transport"))

    async def _check_cancelled(self) -> None:
        handles = sorted({handle for _, handle in self.runs.values()})
        try:
            states = await self.adapter.status_many(handles)
        except Exception:  # reconciliation asks again
            return
        for handle, state in states.items():
            if state is JobState.CANCELLED:
                for run, followed in list(self.runs.values()):
                    if followed == handle:
                        self.cancelled(run, f"the {self.adapter.name} job {handle} holding "
                                            f"this idempotency key was cancelled")
