"""The run ledger: a durable record of every run, so no result depends on one process.

The ledger is what makes idempotency work across processes (two callers claiming one key
get one backend job), what lets ``detach`` hand back a run id whose result can be fetched
later, and what a restarted caller reads to recover. Implementations: ``memory://``,
``sqlite:///path`` (the embedded default, WAL), ``redis://`` and ``postgresql://``.

All methods are coroutines; an implementation with a blocking client runs it in a worker
thread so the event loop never blocks.
"""

from __future__ import annotations

import abc
import importlib
import time
from types import ModuleType
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.policies import RunState

# Run states as the ledger records them: the plain values of core.policies.RunState (a
# database, JSON or msgpack row stores the text; drivers that treat enums specially never
# see one).
SUBMITTED: Final = RunState.SUBMITTED.value
RUNNING: Final = RunState.RUNNING.value
SUCCEEDED: Final = RunState.SUCCEEDED.value
FAILED: Final = RunState.FAILED.value
CANCELLED: Final = RunState.CANCELLED.value
LOST: Final = RunState.LOST.value
DETACHED: Final = RunState.DETACHED.value
TERMINAL_STATES: Final = frozenset({SUCCEEDED, FAILED, CANCELLED, LOST})
STATES: Final = (SUBMITTED, RUNNING, SUCCEEDED, FAILED, CANCELLED, LOST, DETACHED)


class RunRecord(msgspec.Struct, kw_only=True):
    """One run. ``outcome`` holds the signed terminal event exactly as the worker sent it
    (an encoded, signed ``EventBatch``), so a reader verifies it before unpickling."""

    run_id: str
    environment: str
    task_id: str = ""
    adapter: str = ""
    idempotency_key: str | None = None
    attempt: int = 1
    state: str = SUBMITTED
    submission: str | None = None  # the backend's handle (job id, workflow id, ...)
    outcome: bytes | None = None
    created_at: float = msgspec.field(default_factory=time.time)
    updated_at: float = msgspec.field(default_factory=time.time)


class RunFilter(msgspec.Struct, frozen=True, kw_only=True):
    """What ``list_runs`` narrows by; None matches anything (see ``Ledger.list_runs``)."""

    state: str | None = None
    environment: str | None = None
    task_id: str | None = None
    since: float | None = None
    until: float | None = None
    submission: str | None = None

    def matches(self, record: RunRecord) -> bool:
        """The filter applied to one record, for a ledger that filters rows itself."""
        return (
            (self.state is None or record.state == self.state)
            and (self.environment is None or record.environment == self.environment)
            and (self.task_id is None or record.task_id == self.task_id)
            and (self.since is None or record.created_at >= self.since)
            and (self.until is None or record.created_at <= self.until)
            and (self.submission is None or record.submission == self.submission)
        )


class Update(msgspec.Struct, frozen=True):
    """A queued ``update``: written with others in one batch (``Ledger.write_many``)."""

    run_id: str
    fields: dict[str, object]


class SetOutcome(msgspec.Struct, frozen=True):
    """A queued ``set_outcome``."""

    run_id: str
    state: str
    outcome: bytes | None


LedgerWrite = RunRecord | Update | SetOutcome  # a RunRecord is a claim


class Ledger(abc.ABC):
    """Where runs are recorded. One instance per URL per process (see ``open_ledger``)."""

    url: str

    @property
    def shareable(self) -> bool:
        """True when another process (a worker, a later caller) can open the same ledger."""
        return True

    @abc.abstractmethod
    async def claim(self, record: RunRecord) -> RunRecord:
        """Insert ``record`` unless a non-final run already holds its idempotency key.

        Returns the record that owns the key afterwards: ``record`` itself when the claim
        won, else the existing run (which may already be terminal, carrying its outcome).
        A key whose earlier run ended ``failed``, ``cancelled`` or ``lost`` is free to be
        claimed again; a ``succeeded`` one keeps answering with its outcome. Atomic across
        processes sharing the ledger. Records without a key are simply inserted.
        """

    async def write_many(self, writes: list[LedgerWrite]) -> list[object]:
        """Apply writes in order; one result per write: what ``claim``/``update``/
        ``set_outcome`` returns, or the exception it raised (one failed write does not
        stop the others). The dispatcher hands over everything queued in a loop turn at
        once, so a ledger that can (SQLite, PostgreSQL) applies a turn's claims, state
        changes and outcomes in one hand-off and one transaction."""
        results: list[object] = []
        for write in writes:
            try:
                results.append(await self._write_one(write))
            except Exception as exc:
                results.append(exc)
        return results

    async def _write_one(self, write: LedgerWrite) -> object:
        if isinstance(write, RunRecord):
            return await self.claim(write)
        if isinstance(write, Update):
            await self.update(write.run_id, **write.fields)
            return None
        return await self.set_outcome(write.run_id, write.state, write.outcome)

    @abc.abstractmethod
    async def update(self, run_id: str, **fields: object) -> None:
        """Set fields (state, attempt, submission, ...) of a run; bumps ``updated_at``."""

    @abc.abstractmethod
    async def set_outcome(self, run_id: str, state: str, outcome: bytes | None) -> bool:
        """Record the terminal state and signed event. First writer wins: returns False
        (and changes nothing) when the run already has an outcome."""

    @abc.abstractmethod
    async def get(self, run_id: str) -> RunRecord | None:
        """The run, or None."""

    @abc.abstractmethod
    async def by_key(self, idempotency_key: str) -> RunRecord | None:
        """The newest run holding this idempotency key, or None."""

    async def list_runs(
        self,
        *,
        limit: int = 100,
        state: str | None = None,
        environment: str | None = None,
        task_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        submission: str | None = None,
    ) -> list[RunRecord]:
        """Newest first. Each filter given narrows the list: ``state``, ``environment``,
        ``task_id`` and ``submission`` (the backend's handle) match exactly; ``since``
        and ``until`` bound ``created_at``, both inclusive (so a reader paging by
        ``until`` also sees runs that share the boundary's timestamp, and drops the ones
        it already showed)."""
        filters = RunFilter(state=state, environment=environment, task_id=task_id,
                            since=since, until=until, submission=submission)
        return await self.select_runs(filters, max(limit, 0))

    async def unfinished_with_submission(
        self, environment: str, submission: str, *, limit: int = 100
    ) -> list[RunRecord]:
        """The runs of ``environment`` not ended (``TERMINAL_STATES``) whose backend handle
        is ``submission``, newest first: more than one means the job is shared (a chunk,
        or runs following one idempotency key's job), so no one of them owns it alone.
        Handles are the backend's, unique only within an environment. No ledger indexes
        ``submission``: this reads the environment's runs (a cancel, not a hot path)."""
        filters = RunFilter(environment=environment, submission=submission)
        found = await self.select_runs(filters, max(limit, 0))
        return [r for r in found if r.state not in TERMINAL_STATES]

    @abc.abstractmethod
    async def select_runs(self, filters: RunFilter, limit: int) -> list[RunRecord]:
        """``list_runs`` for a backend: at most ``limit`` (>= 0) runs, newest first."""

    @abc.abstractmethod
    async def count_runs(self) -> dict[tuple[str, str, str], int]:
        """How many runs the ledger holds per ``(environment, adapter, state)``: what a
        metrics scrape reports, counted by the store rather than by listing every row."""

    async def wait_outcome(
        self, run_id: str, *, timeout: float | None = None, poll: float = 0.05
    ) -> RunRecord | None:
        """Wait until the run has an outcome or a terminal state (some endings keep no
        outcome); None on timeout. Polls by default; an implementation with
        notifications may override it."""
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = await self.get(run_id)
            if record is not None and (
                record.outcome is not None or record.state in TERMINAL_STATES
            ):
                return record
            if deadline is not None and time.monotonic() >= deadline:
                return None
            await asyncio.sleep(poll)

    @abc.abstractmethod
    async def delete(self, run_id: str) -> None:
        """Forget a run (tests and `runs --prune`)."""

    # Leases: named values that expire unless renewed. Task controls keep their
    # concurrency slots, registrations and cache entries here, so they hold across every
    # caller sharing the ledger, and a holder that died lets go within its lease.

    @abc.abstractmethod
    async def lease(self, name: str, holder: str, seconds: float) -> str | None:
        """Give ``name`` to ``holder`` for ``seconds`` unless another holder has it and its
        lease has not expired. None: ``holder`` has it now (taken, or renewed when it
        already had it). Otherwise: the holder that has it. Atomic across processes."""

    @abc.abstractmethod
    async def renew_leases(self, held: dict[str, str], seconds: float) -> None:
        """Extend each ``name -> holder`` lease that ``holder`` still has."""

    @abc.abstractmethod
    async def drop_lease(self, name: str, holder: str) -> None:
        """Let ``name`` go, if ``holder`` has it."""

    @abc.abstractmethod
    async def lease_holder(self, name: str) -> str | None:
        """Who has ``name`` now (an unexpired lease), or None."""

    async def aclose(self) -> None:
        """Release connections. The shared instance is closed at interpreter exit."""


def import_client(*modules: str, extra: str) -> ModuleType:
    """A ledger's client library (the first of ``modules``, imported with the rest), or
    a ``MissingBackendError`` naming ``pip install 'wove-adapters[extra]'``. Only a
    missing library is translated: an import error inside it surfaces as itself."""
    try:
        found = [importlib.import_module(module) for module in modules]
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == modules[0]:
            raise MissingBackendError("ledger", modules[0], extra) from exc
        raise
    return found[0]


def split_parameter(url: str, name: str, default: str,
                    **added: str) -> tuple[str, str]:
    """(``url`` without our own query parameter ``name``, for the client library; its
    value, ``default`` when absent). ``added``: parameters the URL gets when it does not
    set them itself."""
    parts = urlsplit(url)
    value = default
    rest: list[tuple[str, str]] = []
    for key, given in parse_qsl(parts.query, keep_blank_values=True):
        if key == name:
            value = given
        else:
            rest.append((key, given))
    rest += [(key, given) for key, given in added.items() if all(k != key for k, _ in rest)]
    return urlunsplit(parts._replace(query=urlencode(rest))), value
