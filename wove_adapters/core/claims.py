"""Idempotency for backends without their own dedupe: one claim per key in Redis.

Celery and Taskiq accept any number of messages with one task id, so "same key, one job"
needs a claim taken before the message is sent: ``SET NX`` of ``{run, handle}`` under the
key. It holds between callers that share no ledger (two hosts, one broker), which the
ledger's own claim cannot promise. The winner sends the job; every other caller follows the
winner's job (``base.Following``). The owner's requeued attempt moves the claim to its new
job; a claim whose job ended without an outcome (the adapter says so through ``is_dead``)
is taken over; a cancelled run frees its key.

Works on an asyncio Redis client (``redis.asyncio``): the adapter owns the client.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

# Replace (or delete, with an empty ARGV[2]) KEYS[1] only if it still holds ARGV[1].
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


class ClaimContendedError(RuntimeError):
    """The key changed hands on every try: rare, and safe to try again."""


class ForeignClaimError(RuntimeError):
    """The claim's value is not one we wrote (not our JSON): someone else writes there."""


class KeyClaims:
    """Claims under ``prefix`` in one Redis, each living ``ttl`` seconds (a claim outlives
    its job's result by design: the result is what later callers with the key get)."""

    def __init__(self, client: Any, *, prefix: str, ttl: int) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl

    def key(self, idempotency_key: str) -> str:
        return f"{self.prefix}{idempotency_key}"

    async def claim(
        self,
        idempotency_key: str,
        *,
        run_id: str,
        handle: str,
        is_dead: Callable[[str], Awaitable[bool]] | None = None,
    ) -> str | None:
        """Claim the key for ``run_id``'s job ``handle``: None when this run owns it now,
        else the handle of the job that holds it (follow that one)."""
        key = self.key(idempotency_key)
        mine = json.dumps({"run": run_id, "handle": handle})
        for _ in range(5):
            if await self.client.set(key, mine, nx=True, ex=self.ttl):
                return None
            raw = await self.client.get(key)
            if raw is None:
                continue  # expired in between: try again
            holder = self._decode(key, raw)
            held = str(holder.get("handle") or holder.get("task") or "")  # "task": older callers
            if holder.get("run") == run_id or (is_dead is not None and await is_dead(held)):
                if await self._swap(key, raw, mine):
                    return None
                continue
            return held
        raise ClaimContendedError(
            f"could not claim idempotency key {idempotency_key!r} (it changed hands on every "
            f"try); submit again"
        )

    async def holder(self, idempotency_key: str) -> str | None:
        """The handle of the job that holds the key now (a requeue moves it)."""
        key = self.key(idempotency_key)
        raw = await self.client.get(key)
        if not raw:
            return None
        holder = self._decode(key, raw)
        return str(holder.get("handle") or holder.get("task") or "") or None

    async def release(self, idempotency_key: str, *, run_id: str) -> None:
        """Free the key if ``run_id`` still holds it (a cancelled key may run again)."""
        key = self.key(idempotency_key)
        raw = await self.client.get(key)
        if raw is not None and self._decode(key, raw).get("run") == run_id:
            await self._swap(key, raw, "")

    @staticmethod
    def _decode(key: str, raw: bytes | str) -> dict[str, Any]:
        try:
            holder = json.loads(raw)
            if not isinstance(holder, dict):
                raise ValueError(f"a JSON {type(holder).__name__}, not an object")
        except ValueError as exc:  # not JSON (a pickle, say), or not an object
            raise ForeignClaimError(
                f"the idempotency claim {key!r} is not one wove-adapters wrote ({exc!r}); "
                f"delete it, and check who else writes to that Redis"
            ) from None
        return holder

    async def _swap(self, key: str, expected: bytes | str, value: str) -> bool:
        done = await self.client.eval(_COMPARE_AND_SET, 1, key, expected, value, self.ttl)
        return bool(done)
