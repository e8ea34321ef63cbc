"""``memory://``: a ledger that lives and dies with one process.

For tests and for callers that never detach or share idempotency keys with another
process. It is not ``shareable``: a worker cannot record an outcome in it, so the runtime
must not offer ``detach`` on top of it.

Every method does its work without awaiting in between, and a threading lock guards the
dict, so it is safe from many tasks on one loop and from several loops in several threads.
"""

from __future__ import annotations

import collections
import threading
import time

import msgspec

from wove_adapters.core.ledger import (
    HOLDING_STATES,
    check_outcome_state,
    check_update,
    moves_forward,
    outcome_open,
)
from wove_adapters.core.ledger.base import Ledger, RunFilter, RunRecord


def _copy(record: RunRecord) -> RunRecord:
    # Callers get their own copy: mutating a returned record must not edit the ledger.
    return msgspec.structs.replace(record)


class MemoryLedger(Ledger):
    """A dict of runs plus a key -> newest run index. ``memory://NAME`` gives a separate one."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._runs: dict[str, RunRecord] = {}  # insertion order breaks created_at ties
        self._by_key: dict[str, str] = {}  # idempotency key -> newest run_id
        self._leases: dict[str, tuple[str, float]] = {}  # name -> (holder, expires)
        self._lock = threading.Lock()

    @property
    def shareable(self) -> bool:
        return False

    async def claim(self, record: RunRecord) -> RunRecord:
        with self._lock:
            existing = self._runs.get(record.run_id)
            if existing is not None:
                return _copy(existing)
            key = record.idempotency_key
            if key is not None:
                holder = self._runs.get(self._by_key.get(key, ""))
                if holder is not None and holder.state in HOLDING_STATES:
                    return _copy(holder)
                self._by_key[key] = record.run_id
            self._runs[record.run_id] = _copy(record)
            return record

    async def update(self, run_id: str, **fields: object) -> None:
        checked = check_update(run_id, fields)
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                raise KeyError(f"No run {run_id!r} in ledger {self.url}")
            state = checked.get("state")
            if state is not None and not moves_forward(record.state, str(state)):
                checked.pop("state")  # a late write never moves a run backwards
            self._runs[run_id] = msgspec.structs.replace(record, **checked)

    async def set_outcome(self, run_id: str, state: str, outcome: bytes | None) -> bool:
        check_outcome_state(state)
        with self._lock:
            record = self._runs.get(run_id)
            if record is None:
                raise KeyError(f"No run {run_id!r} in ledger {self.url}")
            if not outcome_open(record.state, record.outcome is not None, state):
                return False
            self._runs[run_id] = msgspec.structs.replace(
                record, state=state, outcome=outcome, updated_at=time.time()
            )
            return True

    async def get(self, run_id: str) -> RunRecord | None:
        with self._lock:
            record = self._runs.get(run_id)
            return None if record is None else _copy(record)

    async def by_key(self, idempotency_key: str) -> RunRecord | None:
        with self._lock:
            record = self._runs.get(self._by_key.get(idempotency_key, ""))
            return None if record is None else _copy(record)

    async def select_runs(self, filters: RunFilter, limit: int) -> list[RunRecord]:
        with self._lock:
            ordered = list(self._runs.values())
        # Newest first; among equal created_at the later insert first (stable reverse).
        ordered.reverse()
        ordered.sort(key=lambda r: r.created_at, reverse=True)
        return [_copy(r) for r in ordered if filters.matches(r)][:limit]

    async def count_runs(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(collections.Counter(
                (r.environment, r.adapter, r.state) for r in self._runs.values()
            ))

    async def delete(self, run_id: str) -> None:
        with self._lock:
            record = self._runs.pop(run_id, None)
            if record is not None and record.idempotency_key is not None:
                if self._by_key.get(record.idempotency_key) == run_id:
                    del self._by_key[record.idempotency_key]

    async def lease(self, name: str, holder: str, seconds: float) -> str | None:
        now = time.time()
        with self._lock:
            current = self._leases.get(name)
            if current is not None and current[1] > now and current[0] != holder:
                return current[0]
            self._leases[name] = (holder, now + seconds)
            return None

    async def renew_leases(self, held: dict[str, str], seconds: float) -> None:
        expires = time.time() + seconds
        with self._lock:
            for name, holder in held.items():
                current = self._leases.get(name)
                if current is not None and current[0] == holder:
                    self._leases[name] = (holder, expires)

    async def drop_lease(self, name: str, holder: str) -> None:
        with self._lock:
            current = self._leases.get(name)
            if current is not None and current[0] == holder:
                del self._leases[name]

    async def lease_holder(self, name: str) -> str | None:
        with self._lock:
            current = self._leases.get(name)
            return current[0] if current is not None and current[1] > time.time() else None
