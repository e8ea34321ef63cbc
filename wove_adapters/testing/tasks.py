"""Task functions the conformance suite ships to workers.

Module-level (importable by workers that have wove_adapters installed) and side effects
go to marker files, so the test observes what really ran on the worker's side.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any


class ConformanceError(ValueError):
    """A distinct exception type, to check the original type comes back."""


def add(x: int, y: int = 1) -> int:
    return x + y


def fail(message: str) -> None:
    raise ConformanceError(message)


def digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()}"


def record(directory: str, tag: str, value: int) -> int:
    """Appends one line per execution: the count of lines is the count of executions."""
    with open(Path(directory) / f"{tag}.runs", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    time.sleep(0.5)
    return value * 2


def sleepy(directory: str, tag: str, seconds: float) -> str:
    """Writes ``<tag>.started`` (with its pid), sleeps, then writes ``<tag>.finished``."""
    Path(directory, f"{tag}.started").write_text(str(os.getpid()))
    time.sleep(seconds)
    Path(directory, f"{tag}.finished").write_text(str(os.getpid()))
    return tag


def die_once(directory: str, tag: str) -> str:
    """First attempt writes its pid and waits to be killed; later attempts finish fast."""
    marker = Path(directory, f"{tag}.pid")
    with open(Path(directory) / f"{tag}.attempts", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(120)
    return f"{tag}-done"


def ignore_cancel(directory: str, seconds: float) -> str:
    """A task that will not stop (as one blocked in C code): writes ``stubborn.started``
    (with its pid), swallows the worker's TaskCancelled (writing ``stubborn.ignored``) and
    runs to its end."""
    from wove_adapters.worker.runner import TaskCancelled

    Path(directory, "stubborn.started").write_text(str(os.getpid()))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except TaskCancelled:
            Path(directory, "stubborn.ignored").write_text("yes")
    return "finished anyway"


def sleepy_item(spec: tuple[str, str, float]) -> str:
    """``sleepy`` for a mapped call (one argument): ``(directory, tag, seconds)``."""
    return sleepy(*spec)


def chunk_member(spec: tuple[str, str, bool]) -> str:
    """For a mapped call: ``(directory, tag, die)``. Appends a line to ``<tag>.runs``;
    with ``die``, the first execution writes ``<tag>.pid`` and waits to be killed."""
    directory, tag, die = spec
    with open(Path(directory) / f"{tag}.runs", "a") as handle:
        handle.write(f"{os.getpid()}\n")
    marker = Path(directory, f"{tag}.pid")
    if die and not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(120)
    return tag


class OpensOnUnpickle:
    """A result whose unpickling creates a file: the proof, in security tests, of whether
    a caller unpickled something it should have refused."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def opens_on_unpickle(path: str) -> OpensOnUnpickle:
    return OpensOnUnpickle(path)
