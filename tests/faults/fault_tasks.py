"""Tasks the fault suite ships to workers (imported by reference: workers find this module
through ``PYTHONPATH``, which the harness sets for every worker and caller it starts).

Each execution appends ``start`` and ``end`` lines to ``<markers>/<pid>.log`` (one small
``O_APPEND`` write each, so concurrent executions never interleave a line). The test
reads those files to count executions per tag and the most that ran at once; the clock
is ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process on the machine).
"""

from __future__ import annotations

import os
import signal
import time

# The signals workers use to interrupt a task (stdio: SIGUSR1, process: SIGTERM).
CANCEL_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


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


def work(markers: str, tag: str, seconds: float = 0.0, shielded: float = 0.0) -> str:
    """One execution of ``tag``: start mark, sleep, end mark (also when interrupted: a
    cancelled execution ends where the cancel stopped it).

    ``shielded``: the first seconds of the sleep hold the cancel signals back, as a task
    inside a C call does (the interruption comes when it returns): a cancel then stops
    the task only that much later, which a cap must still count."""
    _mark(markers, "start", tag)
    try:
        if shielded:
            signal.pthread_sigmask(signal.SIG_BLOCK, CANCEL_SIGNALS)
            try:
                time.sleep(shielded)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, CANCEL_SIGNALS)
        if seconds > shielded:
            time.sleep(seconds - shielded)
    finally:
        _mark(markers, "end", tag)
    return expected(tag)
