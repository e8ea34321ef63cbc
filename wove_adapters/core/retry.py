"""``retry_for``: which failures a task's ``retries`` may retry.

Why names and not classes: the setting lives in TOML files and ``WOVE__`` variables, and
the exception's class may exist only where the task runs. A name is either bare
(``ValueError``, ``Transient``), compared with a class's ``__name__``, or qualified
(``builtins.ValueError``, ``myapp.errors.Transient``), compared with
``module.qualname``. Like an ``except`` clause, a name matches the failure's class or any
of its base classes, so ``retry_for = ["OSError"]`` retries a ``ConnectionError``.

When the caller cannot rebuild the task's exception (its class is not importable here),
the failure arrives as ``TaskExecutionError`` with the remote ``kind`` (the class's bare
name) and its traceback text; then only the class itself can be matched (bare name, or
the qualified name the traceback's last line shows), never its base classes, which the
caller does not know.

No ``retry_for`` (None) keeps the old rule: every ``Exception`` is retried, never a
cancellation, an unconfirmed cancel or a ``BaseException`` such as ``SystemExit``. The
same rule holds for the errors ``retry_for`` names: a cancellation is never retried.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from wove_adapters.core import frames
from wove_adapters.core.errors import CancelNotAcknowledgedError, TaskExecutionError

__all__ = ["check_retry_for", "exception_matches", "names_of", "retry_allowed"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
# The last line of a formatted traceback: "pkg.mod.Class: message" or "Class".
_LAST_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*)(?::|$)")


@functools.lru_cache(maxsize=256)
def _checked(names: tuple[str, ...]) -> frozenset[str]:
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name.strip()):
            raise ValueError(
                f"retry_for entry {name!r} is not an exception type name; give a bare class "
                "name such as 'ValueError' or a qualified one such as "
                "'myapp.errors.Transient'"
            )
    return frozenset(name.strip() for name in names)


def check_retry_for(names: Iterable[str] | str | None) -> frozenset[str] | None:
    """The names of a ``retry_for`` setting, checked; None when the setting is unset.

    A single string is one name (a config file may say ``retry_for = "ValueError"``)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    return _checked(tuple(names))


def names_of(cls: type) -> frozenset[str]:
    """Every name ``cls`` answers to: bare and qualified, for it and its base classes."""
    found: set[str] = set()
    for klass in cls.__mro__:
        if klass is object:
            continue
        found.add(klass.__name__)
        found.add(f"{klass.__module__}.{klass.__qualname__}")
    return frozenset(found)


def _remote_names(error: Mapping[str, Any]) -> frozenset[str]:
    """What a failure the caller could not rebuild answers to: its bare kind, and the
    qualified name its traceback's last line shows (Python prints ``module.Class`` there
    for every class outside ``builtins`` and ``__main__``)."""
    found = {str(error.get("kind") or "")}
    lines = [line for line in str(error.get("traceback") or "").splitlines() if line.strip()]
    if lines and not lines[-1].startswith(" "):
        match = _LAST_LINE.match(lines[-1])
        if match and match.group(1).rsplit(".", 1)[-1] == error.get("kind"):
            found.add(match.group(1))
    found.discard("")
    return frozenset(found)


def exception_matches(exc: BaseException, names: Iterable[str]) -> bool:
    """True when ``exc`` is of a type ``names`` lists, as an ``except`` clause would say."""
    wanted = check_retry_for(list(names)) or frozenset()
    if isinstance(exc, TaskExecutionError) and isinstance(getattr(exc, "payload", None), dict):
        return bool(wanted & _remote_names(exc.payload))
    return bool(wanted & names_of(type(exc)))


def retry_allowed(frame: Mapping[str, Any], retry_for: Iterable[str] | None) -> bool:
    """May this terminal frame be retried (``retries`` permitting)?

    Only a ``task_error``: never a result or a cancellation, nor an unconfirmed cancel,
    nor a ``BaseException`` that is not an ``Exception`` (the task asked to stop). With
    ``retry_for``, the failure's type must also be one it names."""
    if frame.get("type") != frames.TASK_ERROR:
        return False
    exc = frame.get("exception")
    if isinstance(exc, CancelNotAcknowledgedError):
        return False
    if exc is not None and not isinstance(exc, Exception):
        return False
    if retry_for is None:
        return True
    if exc is None:  # no exception object: only the payload's kind is known
        return exception_matches(TaskExecutionError(dict(frame.get("error") or {})), retry_for)
    return exception_matches(exc, retry_for)
