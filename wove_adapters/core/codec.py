"""Rebuild a remote task's exception in the caller, with the task's own traceback.

A pickled exception loses its traceback: unpickled in the caller, it would show only the
caller's frames (the Hub, the dispatcher) and none of the task's. This module gives it
back the way ``concurrent.futures.process`` does: the original exception type, with
``__cause__`` set to a ``RemoteTraceback`` whose ``str`` is the worker's formatted
traceback, so ``traceback.print_exc()`` in the caller prints the worker's frames first
("The above exception was the direct cause of the following exception"). An exception
that cannot be unpickled here (its class exists only on the worker) becomes a
``TaskExecutionError`` with the remote kind, message and traceback, chained the same way.

Only the standard library is imported: ``core`` stays free of backend libraries.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from wove_adapters.core.errors import TaskExecutionError

__all__ = ["RemoteTraceback", "attach_remote_traceback", "rebuild_exception"]


class RemoteTraceback(Exception):
    """The worker's formatted traceback, chained as ``__cause__`` of a rebuilt exception.

    Its ``str`` is the traceback text itself, so the caller's printed traceback shows the
    task's frames (file, line, function) as the worker saw them."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def attach_remote_traceback(exc: BaseException, remote_traceback: str) -> BaseException:
    """Chain ``remote_traceback`` to ``exc`` as its cause; returns ``exc``.

    Idempotent (a second call keeps the first chain), and a no-op for an empty text, so
    every path that rebuilds an exception may call it without coordinating with others.
    The remote text already contains the remote exception's own causes and contexts.
    """
    if not remote_traceback or isinstance(exc.__cause__, RemoteTraceback):
        return exc
    exc.__cause__ = RemoteTraceback(f'\n"""\n{remote_traceback.rstrip()}\n"""')
    return exc


def rebuild_exception(error: Mapping[str, Any], pickled: bytes | None) -> BaseException:
    """The caller-side exception for a ``task_error`` event.

    ``error`` is the normalized payload (``kind``, ``message``, ``traceback``, ...);
    ``pickled`` the cloudpickled original exception, if the worker could pickle it. The
    original type comes back when it unpickles here, else ``TaskExecutionError``; either
    way with the worker's traceback chained (see the module docstring). Drop-in for the
    block in ``core.runtime.wire_to_frame`` that builds ``frame["exception"]``.
    """
    payload = dict(error)
    exc: BaseException | None = None
    if pickled is not None:
        try:
            loaded = pickle.loads(pickled)  # cloudpickle's loads is pickle's
        except Exception:
            loaded = None
        if isinstance(loaded, BaseException):
            exc = loaded
    if exc is None:
        exc = TaskExecutionError(payload)
    return attach_remote_traceback(exc, str(payload.get("traceback") or ""))
