"""Tasks the fault suite ships to workers (imported by reference: workers find this module
through ``PYTHONPATH``, which the harness sets for every worker and caller it starts).

Each execution appends ``start`` and ``end`` lines to ``<markers>/<pid>.log`` (one small
``O_APPEND`` write each, so concurrent executions never interleave a line). The test
reads those files to count executions per tag and the most that ran at once; the clock
is ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine).
"""

from __future__ import annotations

import os
import time


def _mark(markers: str, event: str, tag: str) -> None:
    line = f"{event} {tag} {time.monotonic():.6f} {os.getpid()}\n".encode()
    fd = os.open(os.path.join(markers, f"{os.getpid()}.log"),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def expected(tag: str) -> str:
    """What ``work(markers, tag, ...)`` returns: a value only this tag's run can give."""
    return f"done:{tag}"


def work(markers: str, tag: str, seconds: float = 0.0) -> str:
    """One execution of ``tag``: start mark, sleep, end mark (also when interrupted: a
    cancelled execution ends where the cancel stopped it)."""
    _mark(markers, "start", tag)
    try:
        if seconds:
            time.sleep(seconds)
    finally:
        _mark(markers, "end", tag)
    return expected(tag)
