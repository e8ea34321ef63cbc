"""What a broker writer plants in the tests/security/test_broker_<backend>.py suites.

A ``Bomb`` unpickles into ``open(marker, "w")``: the marker file (the ``marker``
fixture of conftest.py) exists exactly when some process unpickled what the writer
planted. Planted jobs never enter a queue a worker reads (workers run what the broker
tells them by design), so a marker can only come from the caller. Every test runs its
caller in ``with caller(...)``, which ends with ``assert_not_unpickled``.
"""

from __future__ import annotations

import base64
import contextlib
import pickle
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks


class Bomb:
    """Creates ``marker`` when unpickled (the class itself is not needed to unpickle it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def bomb(marker: Path) -> bytes:
    return pickle.dumps(Bomb(marker))


def bomb_b64(marker: Path) -> str:
    return base64.b64encode(bomb(marker)).decode("ascii")


def assert_not_unpickled(marker: Path) -> None:
    assert not marker.exists(), "the caller unpickled what a broker writer planted"


@contextlib.contextmanager
def caller(
    marker: Path, executor: str, executor_config: Mapping[str, Any], bound: float,
    **policy: Any,
) -> Iterator[Hub]:
    """The caller under attack: a Hub whose one environment (named ``executor``) gives up
    on a job nobody works on ("fail": a planted job has no worker) and on any run after
    ``bound`` seconds (``policy`` overrides either). Closed when the block ends; then
    nothing planted may have been unpickled."""
    definition = {"executor": executor, "executor_config": dict(executor_config),
                  "delivery_orphan_policy": "fail", "delivery_timeout": bound, **policy}
    hub = Hub(environments={executor: definition}, default_environment=executor)
    try:
        yield hub
    finally:
        hub.close()
    assert_not_unpickled(marker)


def new_key() -> str:
    """An idempotency key no other test uses (the writer plants under it first)."""
    return f"sec{uuid.uuid4().hex[:8]}"


def keyed(hub: Hub, key: str) -> Any:
    """The caller's run under idempotency key ``key``: it follows whatever the key names."""
    return hub.submit(tasks.add, 1, 2, task_options={"delivery_idempotency_key": key})
