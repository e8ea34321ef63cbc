"""``redis://host:port/db?prefix=...``: a ledger shared by callers and workers on many hosts.

Layout under the prefix (default ``wove-adapters:ledger:``):

- ``{prefix}run:{run_id}``  a hash per run; a ``None`` field is simply absent
- ``{prefix}key:{key}``     the run_id that last claimed an idempotency key
- ``{prefix}runs``          a sorted set of run_ids scored by ``created_at`` (listing)
- ``{prefix}lease:{name}``  a lease: the holder, expiring with the lease (PX)

Every read-check-write (claim, set_outcome, update, delete) is one Lua script, so it is
atomic on the server however many processes race. Scripts touch keys derived from the
prefix that they do not declare, which is fine on a single Redis server or a replica set
and not supported on Redis Cluster.

``redis`` is imported lazily (``pip install 'wove-adapters[redis]'``); async clients bind
to the loop that made them, so one client is kept per running loop.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import TYPE_CHECKING, Any, Final

from wove_adapters.core.ledger import (
    HOLDING_STATES,
    SEALED_STATES,
    STATE_RANK,
    TERMINAL_RANK,
    PerLoop,
    check_outcome_state,
    check_update,
    created_record,
    state_rank,
)
from wove_adapters.core.ledger.base import (
    Ledger,
    RunFilter,
    RunRecord,
    import_client,
    split_parameter,
)

if TYPE_CHECKING:
    from types import ModuleType

DEFAULT_PREFIX: Final = "wove-adapters:ledger:"
_COUNT_PAGE: Final = 1000  # runs read per pipeline by count_runs
_FIELDS: Final = tuple(RunRecord.__struct_fields__)
_HOLDING_LUA: Final = " or ".join(f"state == '{s}'" for s in sorted(HOLDING_STATES))
_SEALED_LUA: Final = " or ".join(f"current == '{s}'" for s in sorted(SEALED_STATES))
_RANKS_LUA: Final = ", ".join(f"['{name}'] = {rank}" for name, rank in STATE_RANK.items())

# KEYS: run hash, key mapping, run index. ARGV: run_id, has_key, created_at, run-hash
# prefix, then the record's field/value pairs. Returns {1} when the claim won, else
# {0, HGETALL of the run that owns the key (or of the same run_id, on a retried claim)}.
_CLAIM_LUA: Final = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {{0, redis.call('HGETALL', KEYS[1])}}
end
if ARGV[2] == '1' then
  local holder = redis.call('GET', KEYS[2])
  if holder then
    local holder_key = ARGV[4] .. holder
    local state = redis.call('HGET', holder_key, 'state')
    if {_HOLDING_LUA} then
      return {{0, redis.call('HGETALL', holder_key)}}
    end
  end
  redis.call('SET', KEYS[2], ARGV[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return {{1}}
"""

# KEYS: run hash (and the run index, to create). ARGV: state, updated_at, has_outcome,
# outcome, then (only to create a run the ledger does not hold) '1', created_at, run_id
# and the new run-hash field/value pairs. -1 unknown run, 0 lost the race (an outcome is
# already there, or the run ended otherwise: see core.ledger.outcome_open), 1 recorded.
SET_OUTCOME_LUA: Final = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[5] == '1' then
    redis.call('HSET', KEYS[1], unpack(ARGV, 8))
    redis.call('ZADD', KEYS[2], ARGV[6], ARGV[7])
    return 1
  end
  return -1
end
if redis.call('HEXISTS', KEYS[1], 'outcome') == 1 then return 0 end
local current = redis.call('HGET', KEYS[1], 'state')
if ({_SEALED_LUA}) and current ~= ARGV[1] then return 0 end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2], 'outcome', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2])
end
return 1
"""

# KEYS: run hash. ARGV: n, new state ('' for none), its rank, n field/value pairs to set,
# then fields to delete (None values). The state is set only when its rank is higher than
# the stored one (core.ledger.STATE_RANK): states only move forward.
_UPDATE_LUA: Final = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[1])
if n > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 4, 2 * n + 3)) end
for i = 2 * n + 4, #ARGV do redis.call('HDEL', KEYS[1], ARGV[i]) end
if ARGV[2] ~= '' then
  local ranks = {{{_RANKS_LUA}}}
  local current = redis.call('HGET', KEYS[1], 'state')
  local rank = -1
  if current then rank = ranks[current] or {TERMINAL_RANK} end
  if tonumber(ARGV[3]) > rank then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
end
return 1
"""

# KEYS: run hash, run index. ARGV: run_id, key-mapping prefix. Drops the key mapping only
# when it still points at this run.
# KEYS: the lease. ARGV: holder, milliseconds. Returns nil when the holder has it now.
_LEASE_LUA: Final = """
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""
# KEYS: leases. ARGV: milliseconds, then one holder per key.
_RENEW_LUA: Final = """
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  end
end
return 0
"""
# KEYS: the lease. ARGV: holder.
_DROP_LUA: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
_DELETE_LUA: Final = """
local key = redis.call('HGET', KEYS[1], 'idempotency_key')
if key then
  local mapping = ARGV[2] .. key
  if redis.call('GET', mapping) == ARGV[1] then redis.call('DEL', mapping) end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def _import_redis() -> ModuleType:
    return import_client("redis", "redis.asyncio", extra="redis")


def parse_redis_url(url: str) -> tuple[str, str]:
    """Split off our ``prefix`` parameter: (URL for redis-py, key prefix)."""
    return split_parameter(url, "prefix", DEFAULT_PREFIX)


def _encode(value: object) -> bytes | str:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float):
        return repr(value)  # repr round-trips a float exactly
    return str(value)


def _pairs(values: dict[str, object]) -> list[bytes | str]:
    pairs: list[bytes | str] = []
    for name, value in values.items():
        if value is not None:
            pairs += [name, _encode(value)]
    return pairs


def _decode(flat: list[bytes] | dict[bytes, bytes]) -> RunRecord:
    raw = flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
    fields: dict[str, Any] = {}
    for name_bytes, value in raw.items():
        name = name_bytes.decode()
        if name == "outcome":
            fields[name] = bytes(value)
        elif name == "attempt":
            fields[name] = int(value)
        elif name in ("created_at", "updated_at"):
            fields[name] = float(value)
        elif name in _FIELDS:
            fields[name] = value.decode()
    return RunRecord(**fields)


@dataclasses.dataclass
class _Client:
    """One loop's client and its scripts (scripts are bound to a client)."""

    redis: Any
    claim: Any
    set_outcome: Any
    update: Any
    delete: Any
    lease: Any
    renew: Any
    drop: Any


class RedisLedger(Ledger):
    """Runs as Redis hashes; atomic steps as Lua scripts (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self._redis = _import_redis()
        self.url = url
        self._client_url, self.prefix = parse_redis_url(url)
        self._clients: PerLoop[_Client] = PerLoop()

    def _make_client(self) -> _Client:
        client = self._redis.asyncio.Redis.from_url(
            self._client_url, socket_connect_timeout=5, socket_timeout=30
        )
        return _Client(
            redis=client,
            claim=client.register_script(_CLAIM_LUA),
            set_outcome=client.register_script(SET_OUTCOME_LUA),
            update=client.register_script(_UPDATE_LUA),
            delete=client.register_script(_DELETE_LUA),
            lease=client.register_script(_LEASE_LUA),
            renew=client.register_script(_RENEW_LUA),
            drop=client.register_script(_DROP_LUA),
        )

    def _client(self) -> _Client:
        return self._clients.get_or_create(self._make_client)

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def _map_key(self, key: str) -> str:
        return f"{self.prefix}key:{key}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}runs"

    async def claim(self, record: RunRecord) -> RunRecord:
        key = record.idempotency_key
        values = {name: getattr(record, name) for name in _FIELDS}
        result = await self._client().claim(
            keys=[self._run_key(record.run_id), self._map_key(key or ""), self._index_key],
            args=[
                record.run_id,
                "0" if key is None else "1",
                repr(record.created_at),
                f"{self.prefix}run:",
                *_pairs(values),
            ],
        )
        if int(result[0]) == 1:
            return record
        return _decode(result[1])

    async def update(self, run_id: str, **fields: object) -> None:
        checked = check_update(run_id, fields)
        state = checked.pop("state", None)
        to_set = _pairs(checked)
        to_delete = [name for name, value in checked.items() if value is None]
        state_args = ["", "-1"] if state is None else [str(state), str(state_rank(str(state)))]
        done = await self._client().update(
            keys=[self._run_key(run_id)],
            args=[len(to_set) // 2, *state_args, *to_set, *to_delete],
        )
        if not int(done):
            raise KeyError(f"No run {run_id!r} in ledger {self.url}")

    async def set_outcome(self, run_id: str, state: str, outcome: bytes | None) -> bool:
        check_outcome_state(state)
        result = int(
            await self._client().set_outcome(
                keys=[self._run_key(run_id)], args=_outcome_args(state, outcome)
            )
        )
        if result < 0:
            raise KeyError(f"No run {run_id!r} in ledger {self.url}")
        return result == 1

    async def get(self, run_id: str) -> RunRecord | None:
        raw = await self._client().redis.hgetall(self._run_key(run_id))
        return _decode(raw) if raw else None

    async def by_key(self, idempotency_key: str) -> RunRecord | None:
        run_id = await self._client().redis.get(self._map_key(idempotency_key))
        return None if run_id is None else await self.get(run_id.decode())

    async def select_runs(self, filters: RunFilter, limit: int) -> list[RunRecord]:
        if limit <= 0:
            return []
        client = self._client().redis
        filtered = any(value is not None for value in
                       (filters.state, filters.environment, filters.task_id,
                        filters.submission))
        page = max(limit, 200) if filtered else limit
        high: float | str = "+inf" if filters.until is None else filters.until
        low: float | str = "-inf" if filters.since is None else filters.since
        found: list[RunRecord] = []
        start = 0
        while len(found) < limit:
            # The index's score is created_at, so the time bounds are the server's work.
            run_ids = await client.zrevrangebyscore(
                self._index_key, high, low, start=start, num=page
            )
            if not run_ids:
                break
            found += [r for r in await self._records(run_ids) if filters.matches(r)]
            start += page
        return found[:limit]

    async def _records(self, run_ids: list[bytes]) -> list[RunRecord]:
        """The runs behind index entries, in order; one deleted meanwhile is left out."""
        async with self._client().redis.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hgetall(self._run_key(run_id.decode()))
            rows = await pipe.execute()
        return [_decode(raw) for raw in rows if raw]

    async def count_runs(self) -> dict[tuple[str, str, str], int]:
        """Redis keeps no count per state, so this reads three fields of every run, a
        page of the index at a time (one pipeline per page): a scrape costs O(runs)."""
        client = self._client().redis
        counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        start = 0
        while True:
            run_ids = await client.zrange(self._index_key, start, start + _COUNT_PAGE - 1)
            if not run_ids:
                return dict(counts)
            async with client.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.hmget(self._run_key(run_id.decode()), "environment", "adapter", "state")
                rows = await pipe.execute()
            for env, adapter, state in rows:
                if state is not None:  # deleted between the two reads
                    counts[(env.decode(), (adapter or b"").decode(), state.decode())] += 1
            start += _COUNT_PAGE

    async def delete(self, run_id: str) -> None:
        await self._client().delete(
            keys=[self._run_key(run_id), self._index_key], args=[run_id, f"{self.prefix}key:"]
        )

    def _lease_key(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    async def lease(self, name: str, holder: str, seconds: float) -> str | None:
        current = await self._client().lease(
            keys=[self._lease_key(name)], args=[holder, max(1, int(seconds * 1000))]
        )
        return None if current is None else bytes(current).decode()

    async def renew_leases(self, held: dict[str, str], seconds: float) -> None:
        if held:
            await self._client().renew(
                keys=[self._lease_key(name) for name in held],
                args=[max(1, int(seconds * 1000)), *held.values()],
            )

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._client().drop(keys=[self._lease_key(name)], args=[holder])

    async def lease_holder(self, name: str) -> str | None:
        current = await self._client().redis.get(self._lease_key(name))
        return None if current is None else bytes(current).decode()

    async def aclose(self) -> None:
        """Close this loop's client. Each loop that used the ledger closes its own (a
        client cannot be closed from another loop); those of closed loops are dropped."""
        client = self._clients.pop_current()
        if client is not None:
            await client.redis.aclose()


def _outcome_args(state: str, outcome: bytes | None) -> list[bytes | str]:
    return [state, repr(time.time()), "0" if outcome is None else "1", outcome or b""]


def record_outcome_sync(
    url: str, run_id: str, state: str, outcome: bytes, *, create: RunRecord | None = None
) -> bool:
    """``core.ledger.record_outcome_sync`` for ``redis://`` (which checked its
    arguments): redis-py's sync client."""
    redis = _import_redis()
    client_url, prefix = parse_redis_url(url)
    keys = [f"{prefix}run:{run_id}", f"{prefix}runs"]
    args = _outcome_args(state, outcome)
    if create is not None:
        record = created_record(create, state, outcome)
        values = {name: getattr(record, name) for name in _FIELDS}
        args += ["1", repr(record.created_at), run_id, *_pairs(values)]
    client = redis.Redis.from_url(client_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        result = int(client.register_script(SET_OUTCOME_LUA)(keys=keys, args=args))
    finally:
        client.close()
    if result < 0:
        raise KeyError(f"No run {run_id!r} in ledger {url}")
    return result == 1
