"""What a broker writer plants in the tests/security/test_broker_<backend>.py suites.

A ``Bomb`` unpickles into ``open(marker, "w")``: the marker file exists exactly when some
process unpickled what the writer planted. Planted jobs never enter a queue a worker
reads (workers run what the broker tells them by design), so a marker can only come from
the caller. Every test ends with ``assert_not_unpickled``.
"""

from __future__ import annotations

import base64
import pickle
from pathlib import Path
from typing import Any

import pytest


class Bomb:
    """Creates ``marker`` when unpickled (the class itself is not needed to unpickle it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "unpickled-in-the-caller"


def bomb(marker: Path) -> bytes:
    return pickle.dumps(Bomb(marker))


def bomb_b64(marker: Path) -> str:
    return base64.b64encode(bomb(marker)).decode("ascii")


def assert_not_unpickled(marker: Path) -> None:
    assert not marker.exists(), "the caller unpickled what a broker writer planted"
