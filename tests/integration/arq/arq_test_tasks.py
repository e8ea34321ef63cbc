"""Task functions only the arq tests use (importable by the workers, which run from this
directory); the conformance suite's tasks live in ``wove_adapters.testing.tasks``."""

from __future__ import annotations

import os
import time
from pathlib import Path


def slow_record(directory: str, tag: str, seconds: float) -> str:
    """One line in ``<tag>.runs`` per execution, then sleeps, then ``<tag>.finished``."""
    with open(Path(directory) / f"{tag}.runs", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    Path(directory, f"{tag}.finished").write_text(str(os.getpid()))
    return tag


def fail_once(directory: str, tag: str) -> str:
    """Raises on its first execution, succeeds afterwards."""
    path = Path(directory) / f"{tag}.runs"
    with open(path, "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if len(path.read_text().splitlines()) == 1:
        raise RuntimeError(f"{tag}: first try fails")
    return f"{tag}-ok"


def add_at(at: float, x: int) -> int:
    """``x + 1``, returned at wall-clock time ``at``: runs started apart end together."""
    time.sleep(max(at - time.time(), 0.0))
    return x + 1
