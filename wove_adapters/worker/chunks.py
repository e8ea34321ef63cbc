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
A run's captured log frames (``worker.tasklogs``) ride in the batch just ahead of its
terminal event, so each keeps its own run id however many runs share the request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.policies import RunState
from wove_adapters.worker import runner, sender

# How long a finished run's terminal event may wait for its neighbours before the batch
# goes back: short enough that a caller sees results stream, long enough that a burst of
# millisecond tasks shares one request.
FLUSH_SECONDS = 0.02
# A batch this large goes back at once, whatever its age (bounded request bodies).
FLUSH_COUNT = 64
# Nor may the runs' log frames (``worker.tasklogs``) grow a batch past about this.
FLUSH_LOG_BYTES = 512 * 1024


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

    @property
    def state(self) -> RunState:
        """How the job went, for the backend's own record of it: REFUSED when no piece
        verified, CANCELLED when it was stopped, else SUCCEEDED (each run reported its
        own outcome)."""
        if self.refused and not self.outcomes:
            return RunState.REFUSED
        return RunState.CANCELLED if self.cancelled else RunState.SUCCEEDED

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


class _Batch:
    """Terminal events waiting to go back together; flushed by the runs' thread and by
    the shared timer thread (``runner.HeartbeatTimer``), one flush at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sending = threading.Lock()
        self._items: list[runner.Terminal] = []
        self._since = 0.0
        self._log_bytes = 0

    def add(self, item: runner.Terminal) -> None:
        outcome = item[2]
        logged = 0
        if outcome is not None and outcome.logs:
            logged = sum(len(log.message) + len(log.exc_text) for log in outcome.logs)
        with self._lock:
            if not self._items:
                self._since = time.monotonic()
            self._items.append(item)
            self._log_bytes += logged
            full = len(self._items) >= FLUSH_COUNT or self._log_bytes >= FLUSH_LOG_BYTES
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
                self._log_bytes = 0
            if items:
                runner.deliver_terminals(items)


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
