"""The worker side of a chunk: several runs of one mapped call carried by one backend
message, so a thousand short tasks cost the backend tens of messages, not a thousand.

Each piece is a whole signed payload and is verified on its own before anything in it is
unpickled (a piece that does not verify is refused alone; its neighbours run). The runs
go one after the other in this thread, each with its own events: ``task_started`` and
heartbeats for a run that outlives the short-task window, and its own terminal event.
Terminal events are not posted one request per run: they gather for at most
``FLUSH_SECONDS`` and go back together (one signed batch, one request), so results still
stream back while the chunk runs. A run the caller cancelled inside this chunk is named
in the receiver's answer to an earlier batch (``sender.cancelled``) and never starts.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from dataclasses import dataclass, field

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames
from wove_adapters.core.envelope import Envelope, ReturnPath
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.policies import RunState
from wove_adapters.worker import runner, sender

# How long a finished run's terminal event may wait for its neighbours before the batch
# goes back: short enough that a caller sees results stream, long enough that a burst of
# millisecond tasks shares one request.
FLUSH_SECONDS = 0.02
# A batch this large goes back at once, whatever its age (bounded request bodies).
FLUSH_COUNT = 64


@dataclass
class ChunkOutcome:
    """How a chunk went: each verified run's outcome, the pieces refused, the runs
    skipped because their caller cancelled them, and whether the chunk itself was
    cancelled (SIGTERM or the backend's cancel: the runs after it never started)."""

    outcomes: list[runner.Outcome] = field(default_factory=list)
    refused: int = 0
    skipped: int = 0
    cancelled: bool = False

    @property
    def delivered(self) -> bool:
        """Every outcome reached its caller or the ledger, or the outbox owns it."""
        return all(outcome.delivered for outcome in self.outcomes)

    def settle(self, *, linger: bool = True) -> bool:
        """``Outcome.settle`` for each (they share their batches' outbox items)."""
        return all([outcome.settle(linger=linger) for outcome in self.outcomes])

    def summary(self) -> dict[str, int | str]:
        states: dict[str, int | str] = {"state": "chunk"}
        for outcome in self.outcomes:
            name = outcome.state.value
            states[name] = int(states.get(name, 0)) + 1
        states.update(refused=self.refused, skipped=self.skipped)
        return states


Finished = tuple[Envelope, frames.WireEvent, runner.Outcome]


class _Batch:
    """Terminal events waiting to go back together; flushed by the runs' thread and by
    the shared timer thread (``runner.HeartbeatTimer``), one flush at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._items: list[Finished] = []
        self._since = 0.0

    def add(self, item: Finished) -> None:
        with self._lock:
            if not self._items:
                self._since = time.monotonic()
            self._items.append(item)
            full = len(self._items) >= FLUSH_COUNT
        if full:
            self.flush()

    def tick(self) -> float:
        with self._lock:
            due = bool(self._items) and time.monotonic() - self._since >= FLUSH_SECONDS
        if due:
            self.flush()
        return FLUSH_SECONDS

    def flush(self) -> None:
        with self._sending:
            with self._lock:
                items, self._items = self._items, []
            if items:
                deliver_many(items)


def run_chunk(payload: str | bytes, *, handle_sigterm: bool = True) -> ChunkOutcome:
    """Run every run of a chunk here, in order; see the module docstring. Returns once
    every terminal event reached its caller or the outbox owns it."""
    try:
        pieces = payload_mod.split_chunk(payload)
    except PayloadError as exc:
        runner._refuse(exc)
        return ChunkOutcome(refused=1)
    done = ChunkOutcome()
    batch = _Batch()
    with runner.HeartbeatTimer(FLUSH_SECONDS, batch.tick):
        for piece in pieces:
            try:
                envelope = payload_mod.decode_payload(piece)
            except PayloadError as exc:
                runner._refuse(exc)
                done.refused += 1
                continue
            if sender.cancelled(envelope.run_id):
                done.skipped += 1
                continue
            began = time.monotonic()
            outcome = runner.execute(envelope, handle_sigterm=handle_sigterm)
            assert outcome.event is not None
            done.outcomes.append(outcome)
            batch.add((envelope, outcome.event, outcome))
            if time.monotonic() - began >= FLUSH_SECONDS:
                # A run this long sends its outcome at once (nothing to share a request
                # with), and the answer says which of the next runs were cancelled.
                batch.flush()
            if outcome.state is RunState.CANCELLED:
                # The job itself was stopped (every run of it cancelled, or the worker
                # shutting down): the rest never start; the caller's reconciliation
                # applies each one's orphan policy if it still waits for one.
                done.cancelled = True
                break
    batch.flush()
    return done


def deliver_many(items: list[Finished]) -> None:
    """``runner.deliver_terminal`` for several events: one inline try per destination
    (one signed batch), then the outbox, which retries and records each in its ledger.
    A run the receiver no longer follows is recorded in its ledger, as a single run's is."""
    groups: dict[tuple[ReturnPath, str], list[Finished]] = {}
    for item in items:
        groups.setdefault((item[0].return_path, item[0].key_id), []).append(item)
    for (return_path, key_id), group in groups.items():
        events = [event for _, event, _ in group]
        try:
            if sender.try_post(return_path, key_id, events):
                continue
            why = "the caller did not answer"
        except sender.UnknownRunError as exc:  # the others were routed
            unknown = set(exc.run_ids)
            _record_each([item for item in group if item[0].run_id in unknown])
            continue
        except PayloadError as exc:  # refused for good: the ledger is the only way left
            print(f"wove-adapters worker: the caller refused {len(group)} outcomes: {exc}",
                  file=sys.stderr)
            _record_each(group)
            continue
        first = group[0][0]
        with_ledger = [item for item in group if item[0].ledger]
        pending = sender.Pending(
            return_path,
            key_id,
            events,
            label=f"{len(group)} runs of a chunk ({why})",
            retry_seconds=_bound(first.retry_seconds, sender.RETRY_SECONDS),
            retry_attempts=int(_bound(first.retry_attempts, sender.RETRY_ATTEMPTS)),
            exit_flush_seconds=_bound(first.exit_flush_seconds, sender.EXIT_FLUSH_SECONDS),
            fallback=(
                functools.partial(_record_all, with_ledger)
                if len(with_ledger) == len(group) else None
            ),
        )
        sender.OUTBOX.put(pending)
        for _, _, outcome in group:
            outcome.pending = pending


def _record_each(group: list[Finished]) -> None:
    for envelope, event, outcome in group:
        outcome.delivered = bool(envelope.ledger and runner._record_in_ledger(envelope, event))


def _record_all(group: list[Finished]) -> bool:
    return all([runner._record_in_ledger(envelope, event) for envelope, event, _ in group])


def _bound(value: float | None, default: float) -> float:
    return default if value is None else float(value)
