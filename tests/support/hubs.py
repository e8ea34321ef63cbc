"""Hubs a test makes, each with one environment, all closed when the test ends.

The backends' tests make hubs on the fly (one per configuration they try); a hub left
open keeps its dispatcher, receiver and clients alive into the next test.
"""

from __future__ import annotations

import contextlib
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
