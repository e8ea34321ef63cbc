"""worker/leases.py: what a lease's PTTL says, and one renewal pipeline per client."""

from __future__ import annotations

import asyncio
from typing import Any

from wove_adapters.worker import leases


class _Pipe:
    def __init__(self, client: _Client) -> None:
        self.client = client
        self.writes: list[tuple[str, int]] = []

    async def __aenter__(self) -> _Pipe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    def set(self, key: str, value: str, *, px: int) -> None:
        self.writes.append((key, px))

    async def execute(self) -> None:
        self.client.rounds.append(self.writes)


class _Client:
    """Records each pipeline of lease writes (a stand-in for redis.asyncio.Redis)."""

    def __init__(self) -> None:
        self.rounds: list[list[tuple[str, int]]] = []

    def pipeline(self, *, transaction: bool) -> Any:
        return _Pipe(self)


def test_a_lease_is_alive_while_younger_than_its_seconds_whatever_they_are() -> None:
    for seconds in (1.0, 15.0):
        written = leases.lease_ms(seconds)
        assert leases.alive(written)  # just renewed
        assert leases.alive(written - int(seconds * 1000))  # exactly its seconds old
        assert not leases.alive(written - int(seconds * 1000) - 1)
    assert leases.alive(-1)  # no expiry: not ours to judge


def test_a_missing_lease_is_gone_at_once_or_after_the_grace() -> None:
    assert not leases.LeaseReader().alive("job", -2)
    reader = leases.LeaseReader(unleased_grace=0.2)
    assert reader.alive("job", -2)  # its first moments
    assert reader.alive("job", leases.lease_ms(5))
    assert reader.alive("job", -2)  # seen with a lease: the grace starts again


def test_one_pipeline_renews_every_held_lease() -> None:
    async def scenario() -> list[list[tuple[str, int]]]:
        client = _Client()
        keeper = leases.keeper(client)
        assert leases.keeper(client) is keeper
        keeper.hold("a", 0.3, first_after=0.0)
        keeper.hold("b", 0.3, first_after=0.0)
        await asyncio.sleep(0.15)
        keeper.release("a")
        await asyncio.sleep(0.1)
        await keeper.aclose()
        return client.rounds

    rounds = asyncio.run(scenario())
    assert rounds[0] == [("a", leases.lease_ms(0.3)), ("b", leases.lease_ms(0.3))]
    assert 2 <= len(rounds) <= 4  # renewed every 0.1 s (a third of 0.3)
    assert rounds[-1] == [("b", leases.lease_ms(0.3))]  # "a" released
