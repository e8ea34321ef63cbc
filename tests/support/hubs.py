"""Hubs a test makes, each with one environment, all closed when the test ends.

The backends' tests make hubs on the fly (one per configuration they try); a hub left
open keeps its dispatcher, receiver and clients alive into the next test.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from wove_adapters.integration.hub import Hub


@contextlib.contextmanager
def hub_factory(default_name: str) -> Iterator[Callable[..., Hub]]:
    """``make(definition, name=default_name, **hub_options)``: a Hub whose one (default)
    environment is ``definition``; every hub made is closed when the block ends."""
    made: list[Hub] = []

    def make(definition: dict[str, Any], name: str = default_name, **hub_options: Any) -> Hub:
        hub = Hub(environments={name: definition}, default_environment=name, **hub_options)
        made.append(hub)
        return hub

    try:
        yield make
    finally:
        for hub in made:
            hub.close()


def mapped_handles(hub: Hub, environment: str, fn: Callable[[int], Any], count: int
                   ) -> tuple[list[Any], list[str]]:
    """``hub.map(fn, range(count))`` with each run its own backend job, and those jobs'
    handles, read back from the ledger (where the dispatcher records each submission)."""
    from wove_adapters.core import loop as shared_loop

    since = time.time()
    values = hub.map(fn, range(count), environment=environment, map_chunk_size=0)
    dispatcher = hub.dispatcher(environment)
    shared_loop.run_sync(dispatcher.flush(), 30)
    records = shared_loop.run_sync(
        dispatcher.ledger.list_runs(limit=count, environment=environment, since=since), 30)
    return values, [str(record.submission) for record in records if record.submission]
