"""How the caller's run must end in the tests/security/test_broker_<backend>.py suites.

Whatever a broker writer planted, the caller's run ends (with an error, as lost, or
cancelled) within a bound: it never hangs, and nothing planted is unpickled on the way
(``broker_planting.assert_not_unpickled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from wove_adapters.core.errors import DeliveryOrphanedError, DeliveryTimeoutError


def ends_within(seconds: float, outcome: Callable[[], Any]) -> BaseException | Any:
    """Run ``outcome`` (a future's ``result``), which must end within ``seconds``: the
    run ends with an error or as lost, never hangs. Returns what it raised or returned."""
    started = time.monotonic()
    try:
        value: Any = outcome()
    except BaseException as exc:  # the run's end, under test
        value = exc
    assert time.monotonic() - started < seconds + 5, "the run did not end in time"
    return value


def cancel_ends(hub: Any, future: Any, seconds: float) -> None:
    """Cancel the caller's run: it must end (however) within ``seconds``."""
    hub.cancel(future)
    ends_within(seconds, lambda: future.exception(timeout=seconds))


def times_out(future: Any, seconds: float) -> None:
    """The caller's run must end with its delivery timeout within ``seconds``."""
    ended = ends_within(seconds, lambda: future.result(timeout=seconds))
    assert isinstance(ended, DeliveryTimeoutError), repr(ended)


def ends_lost(future: Any, seconds: float) -> None:
    """The caller's run must end as lost (its orphan policy "fail") within ``seconds``."""
    ended = ends_within(seconds, lambda: future.result(timeout=seconds + 5))
    assert isinstance(ended, DeliveryOrphanedError), repr(ended)


def tampered_ends(how: str, hub: Any, future: Any, seconds: float,
                  status: Callable[[], None]) -> None:
    """The caller's own job was tampered with; it ends as the test says ``how``:
    "cancel" (cancelled), "timeout" (its delivery timeout), or "status" (``status()``
    checks what the caller reads of the job, then the run is cancelled)."""
    if how == "cancel":
        cancel_ends(hub, future, seconds)
    elif how == "timeout":
        times_out(future, seconds)
    else:
        status()
        cancel_ends(hub, future, seconds)
