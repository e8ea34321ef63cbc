"""Shared by the runs page's tests (tests/ui): a task that runs until the test lets it
end, and waits on the ledger. Registered to be pickled by value, so stdio and process
workers run ``hold`` without importing this module."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle

from wove_adapters.core.ledger import open_ledger

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 60.0


def hold(marker: str, most: float = 120.0) -> str:
    """Runs until ``marker`` exists (the test decides when it ends), ``most`` at most."""
    deadline = time.monotonic() + most
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker


def state_of(url: str, run_id: str) -> str | None:
    """The run's state in the ledger at ``url`` (None: no record yet)."""
    record = asyncio.run(open_ledger(url).get(run_id))
    return None if record is None else record.state


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """``check()``'s first truthy answer; an exception counts as not yet (a page element
    replaced while it was read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except Exception:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)
