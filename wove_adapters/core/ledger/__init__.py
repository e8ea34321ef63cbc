"""The run ledger: open one by URL, shared per process; record an outcome without a loop.

``open_ledger(url)`` is the only way the rest of the package gets a ledger, so a short-lived
caller (one weave, one CLI call) and a long-lived hub in the same process share one
connection per URL. Backends are imported only when their scheme is asked for: ``core``
never imports ``redis`` or ``psycopg`` unless the user chose that URL.

``record_outcome_sync`` is for worker processes that have no event loop (a Celery task, a
Slurm job): it opens a plain blocking client, writes the outcome first-writer-wins, and
closes it.

This module also holds the few rules every backend must apply identically (which fields
``update`` may touch, which states hold an idempotency key) so the four implementations
cannot drift apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Final, Generic, TypeVar
from urllib.parse import urlsplit

from wove_adapters.core.ledger.base import (
    CANCELLED,
    DETACHED,
    FAILED,
    LOST,
    RUNNING,
    STATES,
    SUBMITTED,
    SUCCEEDED,
    TERMINAL_STATES,
    Ledger,
    RunFilter,
    RunRecord,
)

__all__ = [
    "CANCELLED",
    "DETACHED",
    "FAILED",
    "HOLDING_STATES",
    "LOST",
    "RANK_SQL",
    "RUNNING",
    "SEALED_STATES",
    "STATES",
    "STATE_RANK",
    "SUBMITTED",
    "SUCCEEDED",
    "SUPPORTED_SCHEMES",
    "TERMINAL_STATES",
    "Ledger",
    "RunFilter",
    "RunRecord",
    "close_all",
    "created_record",
    "forward_assignments",
    "list_filters",
    "moves_forward",
    "open_ledger",
    "outcome_open",
    "record_outcome_sync",
    "state_rank",
]

# A run in one of these states keeps its idempotency key: a second caller with the same
# key joins it (or, for ``succeeded``, reads its outcome) instead of starting a new job.
# ``failed``, ``cancelled`` and ``lost`` release the key so a retry can run again.
HOLDING_STATES: Final = frozenset({SUBMITTED, RUNNING, DETACHED, SUCCEEDED})

# States only move forward: submitted -> running -> (detached) -> one terminal state.
# ``update(state=...)`` applies a state only when its rank is higher than the stored one,
# so a late queued write (``running`` after ``succeeded``, ``detached`` after the worker
# recorded its outcome) changes nothing; a terminal state is never replaced by ``update``.
# ``detached`` is a hand-off, not an ending: the worker's outcome still follows it.
STATE_RANK: Final[Mapping[str, int]] = {SUBMITTED: 0, RUNNING: 1, DETACHED: 2}
TERMINAL_RANK: Final = 3

# ``set_outcome`` records the worker's signed event while the run has none, unless the
# run already ended another way: a run the caller declared ``lost`` without an event
# (it could not know) still takes the outcome its worker reports, but a run recorded
# ``succeeded``, ``failed`` or ``cancelled`` keeps that ending (the same state may still
# gain its event, e.g. a success recorded without its value).
SEALED_STATES: Final = frozenset({SUCCEEDED, FAILED, CANCELLED})


def state_rank(state: str | None) -> int:
    """Where a state stands in a run's life (None: no record yet)."""
    if state is None:
        return -1
    return STATE_RANK.get(state, TERMINAL_RANK)


def moves_forward(current: str | None, new: str) -> bool:
    """True when ``update(state=new)`` may replace ``current`` (see STATE_RANK)."""
    return state_rank(new) > state_rank(current)


# The stored state's rank (STATE_RANK) as SQL, for the forward-only guard.
RANK_SQL: Final = (
    "CASE state "
    + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in STATE_RANK.items())
    + f" ELSE {TERMINAL_RANK} END"
)


def forward_assignments(
    fields: Mapping[str, object], placeholder: str
) -> tuple[list[str], list[object]]:
    """The SET clauses and parameters of an UPDATE in which the state moves only forward,
    decided in the statement itself (atomic: a late queued write cannot replace a state
    another process recorded meanwhile). Column names come from check_update's whitelist,
    never from the caller verbatim; ``placeholder`` is the driver's (``?`` or ``%s``)."""
    assignments: list[str] = []
    params: list[object] = []
    for name, value in fields.items():
        if name == "state":
            assignments.append(
                f"state = CASE WHEN {RANK_SQL} < {placeholder} THEN {placeholder} ELSE state END"
            )
            params += [state_rank(str(value)), value]
        else:
            assignments.append(f"{name} = {placeholder}")
            params.append(value)
    return assignments, params


def outcome_open(current: str, has_outcome: bool, new: str) -> bool:
    """True when ``set_outcome(new, ...)`` may still record over this run (see SEALED_STATES)."""
    return not has_outcome and (current not in SEALED_STATES or current == new)


# scheme -> (module, class). Strings, so nothing is imported until a scheme is used.
_BACKENDS: Final[Mapping[str, tuple[str, str]]] = {
    "memory": ("wove_adapters.core.ledger.memory", "MemoryLedger"),
    "postgres": ("wove_adapters.core.ledger.postgres", "PostgresLedger"),
    "postgresql": ("wove_adapters.core.ledger.postgres", "PostgresLedger"),
    "redis": ("wove_adapters.core.ledger.redis", "RedisLedger"),
    "rediss": ("wove_adapters.core.ledger.redis", "RedisLedger"),
    "sqlite": ("wove_adapters.core.ledger.sqlite", "SqliteLedger"),
}
SUPPORTED_SCHEMES: Final = ("memory", "sqlite", "redis", "postgresql")

_shared: dict[str, Ledger] = {}
_shared_lock = threading.Lock()
_exit_registered = False


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _BACKENDS:
        raise ValueError(
            f"Unsupported ledger URL {url!r}: the scheme must be one of "
            f"{', '.join(SUPPORTED_SCHEMES)} (e.g. 'memory://', 'sqlite:////abs/runs.db', "
            "'redis://127.0.0.1:6379/0', 'postgresql://user@host:5432/db')."
        )
    return scheme


def _canonical_url(url: str) -> str:
    """The key a ledger is shared under: relative SQLite paths become absolute, so two
    spellings of one file share one connection and a worker gets a cwd-proof URL."""
    if _scheme(url) == "sqlite":
        from wove_adapters.core.ledger.sqlite import sqlite_url

        return sqlite_url(url)
    return url


def open_ledger(url: str | None = None) -> Ledger:
    """The process-wide ledger for ``url`` (None: the per-user SQLite default).

    Construction does no I/O; the first operation connects. The same instance may be used
    from several event loops over the process lifetime (each backend handles that), so
    callers never need to close it: ``close_all()`` or interpreter exit does.
    """
    global _exit_registered
    if url is None:
        from wove_adapters.core.paths import default_ledger_url

        url = default_ledger_url()
    key = _canonical_url(url)
    with _shared_lock:
        ledger = _shared.get(key)
        if ledger is None:
            module_name, class_name = _BACKENDS[_scheme(key)]
            cls: type[Ledger] = getattr(importlib.import_module(module_name), class_name)
            ledger = cls(key)  # type: ignore[call-arg]
            if not _exit_registered:
                _exit_registered = True
                # After the shared loop's shutdown hooks (dispatchers flush their writes
                # first), before ``concurrent.futures`` refuses work to the SQLite thread.
                from wove_adapters.core.loop import add_exit_closer

                add_exit_closer(_close_at_exit)
            _shared[key] = ledger
        return ledger


async def close_all() -> None:
    """Close every shared ledger; the next ``open_ledger`` starts fresh (tests, shutdown)."""
    with _shared_lock:
        ledgers = list(_shared.values())
        _shared.clear()
    for ledger in ledgers:
        await ledger.aclose()


def _close_at_exit() -> None:
    # Only the SQLite ledger holds something worth closing synchronously (it checkpoints
    # the WAL on close); network clients die with the process.
    with _shared_lock:
        ledgers = list(_shared.values())
    for ledger in ledgers:
        close = getattr(ledger, "close_sync", None)
        if close is not None:
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                close()



def record_outcome_sync(
    url: str, run_id: str, state: str, outcome: bytes, *, create: RunRecord | None = None
) -> bool:
    """Record a run's terminal state and signed event from code without an event loop.

    First writer wins, exactly as ``Ledger.set_outcome``: True when this call recorded the
    outcome, False when the run already had one (or had ended otherwise). A run the ledger
    does not hold raises KeyError, unless ``create`` is given: then that record is
    inserted with this state and outcome (a worker whose run's claim never reached the
    ledger still leaves an outcome anyone can fetch). Raises ValueError for
    ``memory://`` (another process cannot see it) or an unknown scheme.
    """
    scheme = _scheme(url)
    check_outcome_state(state)
    if scheme == "memory":
        raise ValueError(
            f"The ledger {url!r} is not shareable: a memory ledger lives inside one process, "
            "so a worker cannot record an outcome in it. Use a sqlite://, redis:// or "
            "postgresql:// ledger for runs that outlive or leave the caller."
        )
    if create is not None and create.run_id != run_id:
        raise ValueError(f"record_outcome_sync: create.run_id {create.run_id!r} != {run_id!r}")
    module_name, _ = _BACKENDS[scheme]
    module = importlib.import_module(module_name)
    result: bool = module.record_outcome_sync(url, run_id, state, outcome, create=create)
    return result


def created_record(template: RunRecord, state: str, outcome: bytes | None) -> RunRecord:
    """The row ``record_outcome_sync(create=...)`` inserts: the template, ended. It holds no
    idempotency key: a keyed run's claim is always committed before its job is sent, and a
    key must only ever be taken by ``claim``."""
    now = time.time()
    return RunRecord(
        run_id=template.run_id,
        environment=template.environment,
        task_id=template.task_id,
        adapter=template.adapter,
        idempotency_key=None,
        attempt=template.attempt,
        state=state,
        submission=template.submission,
        outcome=outcome,
        created_at=template.created_at or now,
        updated_at=now,
    )


# ---------------------------------------------------------------------------------------
# Rules shared by every backend.

# Fields ``update`` may set, with the types each accepts. ``run_id``, ``idempotency_key``
# and ``created_at`` are fixed at claim time: ownership of a key is decided by ``claim``
# alone, and ``created_at`` is the listing order.
_UPDATABLE: Final[Mapping[str, tuple[type, ...]]] = {
    "environment": (str,),
    "task_id": (str,),
    "adapter": (str,),
    "attempt": (int,),
    "state": (str,),
    "submission": (str, type(None)),
    "outcome": (bytes, type(None)),
    "updated_at": (float, int),
}


def list_filters(filters: RunFilter, placeholder: str) -> tuple[str, list[object]]:
    """The ``WHERE`` clause (empty without filters) and parameters of ``list_runs`` for a
    SQL ledger, with the driver's parameter placeholder (``?`` or ``%s``)."""
    where: list[str] = []
    params: list[object] = []
    for condition, value in (
        ("state = {}", filters.state),
        ("environment = {}", filters.environment),
        ("task_id = {}", filters.task_id),
        ("created_at >= {}", filters.since),
        ("created_at <= {}", filters.until),
        ("submission = {}", filters.submission),
    ):
        if value is not None:
            where.append(condition.format(placeholder))
            params.append(value)
    return (f" WHERE {' AND '.join(where)}" if where else ""), params


def check_update(run_id: str, fields: Mapping[str, object]) -> dict[str, object]:
    """Validate ``update`` fields and add ``updated_at``; raises ValueError naming the field."""
    checked: dict[str, object] = {}
    for name, value in fields.items():
        types = _UPDATABLE.get(name)
        if types is None:
            if name in RunRecord.__struct_fields__:
                raise ValueError(
                    f"Run {run_id}: field {name!r} is fixed when the run is claimed and "
                    f"cannot be updated (updatable: {', '.join(sorted(_UPDATABLE))})."
                )
            raise ValueError(
                f"Run {run_id}: unknown field {name!r} (updatable: "
                f"{', '.join(sorted(_UPDATABLE))})."
            )
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(
                f"Run {run_id}: field {name!r} must be "
                f"{' or '.join(t.__name__ for t in types)}, not {type(value).__name__}."
            )
        if name == "state" and value not in STATES:
            raise ValueError(f"Run {run_id}: unknown state {value!r} (one of {', '.join(STATES)}).")
        checked[name] = float(value) if name == "updated_at" else value  # type: ignore[arg-type]
    checked.setdefault("updated_at", time.time())
    return checked


def check_outcome_state(state: str) -> None:
    """``set_outcome`` records how a run ended, so only a terminal state makes sense."""
    if state not in TERMINAL_STATES:
        raise ValueError(
            f"set_outcome needs a terminal state ({', '.join(sorted(TERMINAL_STATES))}), "
            f"not {state!r}; use update(state=...) for intermediate states."
        )


T = TypeVar("T")


class PerLoop(Generic[T]):
    """One value (a client, a connection slot) per running event loop.

    Async network clients bind to the loop that created them, but a shared ledger is used
    from several loops over a process's life (a sync facade's loop thread, one loop per
    test). Entries for closed loops are dropped without closing: their transports cannot
    be closed from another loop and are reclaimed with the loop. After ``fork`` every
    inherited entry is dropped, since the child must not share the parent's sockets.
    """

    def __init__(self) -> None:
        self._items: dict[int, tuple[asyncio.AbstractEventLoop, T]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _prune(self) -> None:
        if self._pid != os.getpid():
            self._items.clear()
            self._pid = os.getpid()
        for key, (loop, _) in list(self._items.items()):
            if loop.is_closed():
                del self._items[key]

    def get_or_create(self, factory: Callable[[], T]) -> T:
        """The current loop's value, made by ``factory`` (synchronous, no I/O) if absent."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._prune()
            entry = self._items.get(id(loop))
            if entry is None or entry[0] is not loop:
                entry = (loop, factory())
                self._items[id(loop)] = entry
            return entry[1]

    def pop_current(self) -> T | None:
        """Remove and return the current loop's value (for closing it on that loop)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._prune()
            entry = self._items.pop(id(loop), None)
        return None if entry is None or entry[0] is not loop else entry[1]
