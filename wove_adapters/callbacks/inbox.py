"""The caller's end of one adapter transport's way back: events in, outcomes recovered.

``AdapterTransport`` (``adapters/transport.py``) puts runs out; this takes what comes back
for them, whichever way it came: a verified event from the receiver or the drop box, a
result left in the payload store by reference, events a worker signed and handed back in
the backend's own result (Ray, Dask), or, when none of those arrived, the outcome the
worker recorded in the ledger or in the backend's record of the job. It also decides how
long a job that ended without its terminal event still counts as delivering, so that a
worker's background outbox is waited for and a run is never called lost too early. None of
it depends on the backend: the adapter is reached only through ``outcomes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wove_adapters.callbacks.dropbox import DropboxReader
from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames
from wove_adapters.core.codec import attach_remote_traceback
from wove_adapters.core.doctor import Row, checked_row
from wove_adapters.core.errors import PayloadError, redact_url
from wove_adapters.core.paths import default_store_url
from wove_adapters.core.policies import JobState
from wove_adapters.core.transport import Emit, RunAttempt

# How long doctor waits for the drop box's Redis to answer a PING.
PING_SECONDS = 5.0
# An adapter's ``outcomes``: handle -> the signed outcome its backend recorded.
Outcomes = Callable[[Sequence[str]], Awaitable[dict[str, bytes | Exception]]]


class Inbox:
    """What came back for one transport's runs, as frames for the dispatcher."""

    def __init__(
        self,
        name: str,
        emit: Emit,
        *,
        key_id: str,
        receiver: CallbackReceiver | None,
        ledger_url: str | None,
        store_url: str | None,
        grace: tuple[float, float],
        outcomes: Outcomes,
        on_started: Callable[[str], None],
    ) -> None:
        self.name = name
        self._emit = emit
        self._key_id = key_id
        self.receiver = receiver
        # The Redis drop box is a receiver too: its backlog and its lost outcomes count.
        self._dropbox = receiver if isinstance(receiver, DropboxReader) else None
        self._ledger_url = ledger_url
        self._store_url = store_url
        self._grace = grace
        self._outcomes = outcomes
        self._on_started = on_started
        # Results (and exceptions) workers left in the store for us, by run attempt: taken
        # in a thread (``_taking`` while they are), deleted at release (see ``release``).
        self._result_refs: dict[str, list[payload_mod.BodyRef]] = {}
        self._taking: dict[str, asyncio.Task[None]] = {}
        # Runs whose job ended without their terminal event: when we first saw it.
        self._ended_quiet: dict[str, float] = {}

    # ------------------------------------------------------------ events in

    def sink(self, event: frames.WireEvent, raw: bytes) -> None:
        """A verified event, as a frame for the dispatcher. Unpickling runs on the shared
        loop and may run anything (a ``__reduce__`` that raises, or calls ``sys.exit``):
        ``event_frame`` turns that into the run's own error at once (the loop survives,
        the run is never dropped to wait out its delivery grace)."""
        from wove_adapters.core.codec import stored_refs
        from wove_adapters.core.executors.stdio import event_frame

        if isinstance(event, frames.TaskStarted):
            self._on_started(event.run_id)
        refs = stored_refs(event)
        if refs:
            # Sent by reference (large): fetched, checked and unpickled in a thread, so the
            # loop never reads megabytes; the run counts as delivering meanwhile.
            key = f"{event.run_id}#{event.attempt}"
            self._result_refs.setdefault(key, []).extend(refs)
            task = asyncio.get_running_loop().create_task(self._take(key, event, raw))
            self._taking[key] = task
            task.add_done_callback(lambda _: self._taking.pop(key, None))
            return
        self._emit(_terminal_blob(event_frame(event, where=f"{self.name} receiver"),
                                  event, raw))

    def accept_signed(self, data: bytes) -> JobState:
        """Events a worker signed and handed back through the backend's own result
        (``worker.hosted.run_returned``) instead of POSTing them: checked exactly as the
        receiver checks a request (signature with this process's keys, timestamp window,
        nonce, schema, each run's key binding) before anything in them is unpickled,
        then routed as the receiver routes them (a duplicate terminal event dropped).
        Returns the state the terminal event among them ends its run in (``RunState.
        of_event``; SUCCEEDED when none is there); raises PayloadError (or msgspec's
        DecodeError/ValidationError) for events that do not verify: nothing is routed."""
        receiver = self.receiver
        assert receiver is not None
        key_id, batch = receiver.open_batch(data)
        wrong = receiver.unbound(batch.events, key_id)
        if wrong:
            raise PayloadError(f"signed with key {key_id}, not with the key of run {wrong[0]}")
        receiver.route(batch.events, data)
        ends = (JobState.of_event(str(type(event).__struct_config__.tag))
                for event in batch.events)
        return next((state for state in ends if state.finished), JobState.SUCCEEDED)

    async def _take(self, key: str, event: frames.WireEvent, raw: bytes) -> None:
        """Emit a by-reference event's frame once its bytes are taken from the store; a
        missing or tampered reference becomes the run's error (``event_frame``)."""
        from wove_adapters.core.executors.stdio import event_frame

        frame = await asyncio.to_thread(event_frame, event, where=f"{self.name} receiver")
        self._emit(_terminal_blob(frame, event, raw))

    # ------------------------------------------------------------ verdicts

    async def verdicts(
        self, found: Sequence[tuple[RunAttempt, JobState]]
    ) -> dict[str, JobState]:
        """The backend's state of each run's job, corrected for what may still come back:
        a refused payload becomes the run's error naming the key, and a job that ended
        while its events may still be in the drop box or on their way counts as running
        (``_delivering``)."""
        states: dict[str, JobState] = {}
        backlog: bool | None = None
        for run, state in found:
            if state is JobState.REFUSED:
                self._emit(refused_event(self.name, run, self._key_id))
                states[run.run_id] = JobState.RUNNING  # the error frame ends it
                continue
            if state.finished and self._dropbox is not None:
                if backlog is None:
                    backlog = await self._dropbox.backlog()
                if backlog:  # its events may still be in the list: not lost
                    states[run.run_id] = JobState.RUNNING
                    continue
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
        if key in self._taking:  # its result is being taken from the store
            return JobState.RUNNING
        now = asyncio.get_running_loop().time()
        quiet = now - self._ended_quiet.setdefault(key, now)
        ledger_after, give_up_after = self._grace
        if quiet < ledger_after:  # the worker may still reach us itself
            return JobState.RUNNING
        if await self._resolve_recorded(run):
            self._ended_quiet.pop(key, None)
            return state
        if quiet < give_up_after:  # not recorded: its outbox may still be retrying
            return JobState.RUNNING
        if self._dropbox is not None:
            # The worker pushed its outcome and the list is empty: another reader of the
            # list took it. Say so, rather than calling the run lost for no reason.
            self._emit(frames.error_event(
                run.run_id, run.task_id, self._dropbox.lost_outcome(run.run_id, run.submission),
                attempt=run.attempt, source="transport",
            ))
            return JobState.RUNNING  # the error ends the run
        return state

    async def _resolve_recorded(self, run: RunAttempt) -> bool:
        """Emit the outcome the worker recorded when it could not reach us, if any: in
        the ledger, else in the backend's own record of the job (``adapter.outcomes``:
        where the worker also puts it when the caller did not answer in time, see
        ``worker.runner.deliver_terminals``; the only record when the caller's ledger is
        not shareable). Either is checked against this run before anything in it is
        unpickled."""
        from wove_adapters.core.codec import decode_outcome

        taken: list[payload_mod.BodyRef] = []
        try:
            blob = await self._ledger_outcome(run) or await self._backend_outcome(run)
            if blob is None:
                return False
            frame = await asyncio.to_thread(functools.partial(
                decode_outcome, blob, run.run_id, key_id=self._key_id,
                idempotency_key=run.idempotency_key, task_id=run.task_id, taken=taken,
            ))
        except Exception:  # unreadable: reconciliation reports the run lost
            return False
        finally:  # a result it left in the store is ours to delete (see release)
            if taken:
                self._result_refs.setdefault(f"{run.run_id}#{run.attempt}", []).extend(taken)
        if frame.get("attempt", run.attempt) != run.attempt:
            return False
        self._emit(frame)
        return True

    async def _ledger_outcome(self, run: RunAttempt) -> bytes | None:
        if not self._ledger_url:
            return None
        from wove_adapters.core.ledger import open_ledger

        record = await open_ledger(self._ledger_url).get(run.run_id)
        return None if record is None else record.outcome

    async def _backend_outcome(self, run: RunAttempt) -> bytes | None:
        if run.submission is None:
            return None
        found = (await self._outcomes([run.submission])).get(run.submission)
        return found if isinstance(found, bytes) else None

    # ------------------------------------------------------------ doctor

    async def doctor_rows(self, hosts: list[str] | None) -> list[Row]:
        """Can workers reach us: the drop box's Redis answers, or the receiver answers
        its health check, and is not a loopback address while the workers (``hosts``,
        where the backend names them) run on other machines."""
        if self._dropbox is not None:
            url = redact_url(self._dropbox.redis_url)
            # Bounded: a Redis that stopped answering (killed, or behind a dropped
            # route) holds a client without a socket timeout for good.
            return [await checked_row("return path (redis drop box) reachable",
                                      asyncio.wait_for(self._dropbox.ping(), PING_SECONDS),
                                      url,
                                      lambda exc: f"{url}: {exc!r}; start Redis or set "
                                                  f"executor_config.return_redis_url")]
        if self.receiver is None:
            return []  # the backend carries the outcome itself (return_path "native")
        base = self.receiver.url.split("/wove/events/")[0]
        row = await checked_row("receiver reachable", asyncio.to_thread(_http_get,
                                f"{base}/wove/health"), base, lambda exc: f"{base}: {exc}")
        remote = sorted({host for host in hosts or () if host != socket.gethostname()})
        loopback = any(part in base for part in ("//127.", "//localhost", "//[::1]"))
        if row[1] and remote and loopback:
            row = ("receiver reachable", False,
                   f"{base} is loopback but workers run on {', '.join(remote)}: set "
                   f"executor_config.callback_host / callback_url, or return_path 'redis'")
        return [row]

    # ------------------------------------------------------------ life cycle

    async def release(self, run: RunAttempt, body: payload_mod.BodyRef | None) -> None:
        """Forget an ended run; delete its payload body (``body``) and what its worker left
        in the store for us."""
        key = f"{run.run_id}#{run.attempt}"
        self._ended_quiet.pop(key, None)
        refs = [body] if body is not None else []
        results = self._result_refs.pop(key, [])
        # A result its worker left in the store goes once the run has ended (taken, or
        # ended otherwise: a timeout, a cancel, a reference that failed its check), unless
        # the ledger keeps this run's outcome for later readers (a key, or detach): then
        # it stays until the store expires it (docs/security.md, "Limits").
        if results and run.idempotency_key is None and run.policy.orphan_policy != "detach":
            # Only this attempt's own keys in the store its payload named: a signed event
            # cannot make the caller delete anything else.
            ours = self._store_url or default_store_url()
            mine = payload_mod.store_key(run.run_id, run.attempt) + "."
            refs.extend(r for r in results if r.store == ours and r.key.startswith(mine))
        for ref in refs:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(payload_mod.open_store(ref.store).delete, ref)

    async def aclose(self) -> None:
        for task in list(self._taking.values()):  # results still being taken: moot now
            task.cancel()
        await asyncio.gather(*self._taking.values(), return_exceptions=True)


def _http_get(url: str) -> None:
    with urllib.request.urlopen(url, timeout=5) as response:
        response.read()


def _terminal_blob(frame: dict[str, Any], event: frames.WireEvent, raw: bytes) -> dict[str, Any]:
    terminal = isinstance(event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled))
    if terminal and frame.get("type") == type(event).__struct_config__.tag:
        # The worker's signed event is what the ledger keeps (not when it became an
        # unpicklable-result error: that one the dispatcher signs itself). A result by
        # reference stays in the store for it (see ``release``).
        frame["_blob"] = raw
    return frame


def refused_event(executor: str, run: Any, key_id: str) -> dict[str, Any]:
    """The run's error when its worker refused the payload (``RunState.REFUSED``): the
    worker says so only through the backend's job status (it signs and sends nothing for
    a payload it could not verify), so the caller names the likely cause and the fix. Not
    retryable, and never requeued: the same payload would be refused again."""
    error = PayloadError(
        f"the {executor} worker refused the payload of run {run.run_id} (task "
        f"{run.task_id!r}): it did not verify there. Usually the worker does not hold the "
        f"signing key {key_id}: give it the caller's secret (WOVE_ADAPTERS_SECRET, or "
        f"WOVE_ADAPTERS_SECRETS with older keys after a rotation); else its clock or "
        f"wove-adapters version differs. The worker's log says which."
    )
    return frames.error_event(run.run_id, run.task_id, error, attempt=run.attempt,
                              source="payload")


# ---------------------------------------------------------------- a future as the way back


@dataclass
class Watched:
    """A run whose backend future is watched (Dask, Ray): the future's end becomes its
    terminal event, so no run waits for a reconciliation tick."""

    run_id: str
    task_id: str
    attempt: int


def failure_frame(
    run: Watched, exc: BaseException, *, native: bool, remote_tb: str = ""
) -> dict[str, Any]:
    """The ``task_error`` for an exception the future carries: a payload body that could
    not be read, the task raised (``native`` return path) or our worker function failed.
    ``remote_tb`` (the task's own frames, as the worker saw them) is chained to the
    caller's exception as ``concurrent.futures`` does it."""
    source = "payload" if isinstance(exc, PayloadError) else ("task" if native else "worker")
    frame = frames.error_event(run.run_id, run.task_id, exc, attempt=run.attempt, source=source)
    if remote_tb:
        frame["error"]["traceback"] = remote_tb
        attach_remote_traceback(exc, remote_tb)
    return frame


def refusal_frame(executor: str, run: Any, config: dict[str, Any]) -> dict[str, Any]:
    """``refused_event`` for an adapter that emits its runs' events itself (a future or a
    workflow result as the way back), the signing key read from ``executor_config``'s
    ``_key_id``. ``run`` has ``run_id``, ``task_id`` and ``attempt``."""
    return refused_event(executor, run, str(config.get("_key_id", "?")))


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
