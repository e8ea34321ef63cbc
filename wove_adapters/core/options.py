"""Typed ``executor_config``: what every executor accepts, and the check run at start-up.

Why: adapters read their options with ``config.get``, so a misspelt key used to be
silently ignored (``redis_ulr`` sent jobs to somebody else's default Redis queue and the
caller waited forever). Each executor now declares the keys it reads as a
``msgspec.Struct``: ``ExecutorOptions`` holds the dispatcher's keys (every executor),
``AdapterOptions`` adds the transport's (return path, receiver, payload store, worker
delivery bounds) and each adapter extends it with its own. ``check_executor_config``
compares a configuration with that declaration before anything connects or is submitted.

The declaration is also what an adapter reads: ``AdapterOptions.of(config)`` (the adapter
base calls it) gives the struct with every default in one place and each value coerced
the way configuration sources write it (``"2.5"`` -> 2.5 from a ``WOVE__`` variable, a
path object -> its text); ``None`` means "unset" for every key (as it does in every
configuration source). This module imports no backend library, so ``wove-adapters
config`` and ``doctor`` can check a configuration on a machine without the backend.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, Union

import msgspec

from wove_adapters.core.errors import ExecutorConfigError

# Keys the runtime adds itself (signing key id, shareable ledger); never user keys.
INTERNAL_KEYS = frozenset({"_key_id", "_ledger_url"})

_Options = TypeVar("_Options", bound="ExecutorOptions")


class ExecutorOptions(msgspec.Struct, kw_only=True):
    """Keys the dispatcher reads, valid for every executor (``local`` and ``stdio`` too)."""

    # The signing key: a literal, ``env:VAR`` or ``file:PATH`` (see docs/security.md).
    secret: str | bytes | None = None
    # Seconds a run may stay silent before its job's status is checked (per executor).
    reconcile_seconds: float | None = None
    # Seconds to wait, after the status says finished, for a late terminal event.
    reconcile_grace: float = 0.5
    # After the caller's own loop stalled, no verdict for this long.
    stall_grace_seconds: float = 7.0
    # A run that has not started is reported after this long (then 2x, 4x, ...).
    pending_warning_seconds: float = 60.0
    # A cancelled run's in-flight slot is held at most this long for the backend's stop.
    cancel_release_seconds: float = 60.0
    # Requeues allowed under delivery_orphan_policy = "requeue".
    max_requeues: int = 3
    # Seconds require_ack waits for the cancel to be confirmed.
    cancel_ack_timeout: float = 10.0
    # Per-run options handed to the adapter as JobSpec.options (Hub calls only).
    task_options: dict[str, Any] = {}
    # The caller's cap on one run's task log records (docs/observability.md, "Logs"):
    # beyond either, its records are dropped and counted.
    task_logs_max_records: int = 10_000
    task_logs_max_bytes: int = 16 * 1024 * 1024

    @classmethod
    def of(cls: type[_Options], config: Mapping[str, Any]) -> _Options:
        """The options ``config`` sets, on top of the declared defaults. Unset (None),
        internal and undeclared keys are passed over: ``check_executor_config`` refuses
        an undeclared key when the environment starts, and a bare adapter built in a
        script or a test keeps working as before. A value no declared type can take is
        a ValueError naming the key."""
        fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
        given: dict[str, Any] = {}
        for key, value in config.items():
            field = fields.get(str(key))
            if field is not None and value is not None and key not in INTERNAL_KEYS:
                given[field.name] = _coerced(str(key), value, field.type)
        return cls(**given)


class AdapterOptions(ExecutorOptions, kw_only=True):
    """Keys every adapter accepts: read by ``AdapterTransport``, the receiver and the
    workers' delivery bounds (``adapters/base.py``, ``callbacks/receiver.py``)."""

    # "http" (workers POST to the receiver), "redis" (a drop box), "native" where offered.
    return_path: str = "http"
    return_redis_url: str = "redis://127.0.0.1:6379/0"
    # Where bodies above inline_payload_limit go: file:///dir, redis://..., s3://...
    payload_store: str | None = None
    # Bytes of pickled body carried in the payload itself (default: the adapter's).
    inline_payload_limit: int | None = None
    # Array-capable adapters: submissions within this many seconds form one array job.
    array_window: float = 0.05
    callback_host: str = "127.0.0.1"
    callback_port: int = 0
    callback_url: str | None = None
    callback_token: str | None = None
    # Bytes the receiver takes in one request (events; see docs/security.md, "Limits").
    callback_max_body: int | None = None
    # How long workers keep trying to hand back an outcome (see worker.sender).
    worker_retry_seconds: float | None = None
    worker_retry_attempts: int | None = None
    worker_exit_flush_seconds: float | None = None


def shared_default(key: str) -> Any:
    """The default of a key every executor shares: the dispatcher reads its defaults
    here, so the documented struct is their one source."""
    for field in msgspec.structs.fields(ExecutorOptions):
        if field.encode_name == key:
            return field.default
    raise KeyError(key)


def option_keys(struct: type[ExecutorOptions]) -> list[str]:
    """Every key ``struct`` declares, as written in a configuration, sorted."""
    return sorted(f.encode_name for f in msgspec.structs.fields(struct))


def own_option_keys(struct: type[ExecutorOptions]) -> list[str]:
    """The keys ``struct`` adds to the shared ones (what its adapter's docs table lists)."""
    shared = set(option_keys(AdapterOptions if issubclass(struct, AdapterOptions)
                             else ExecutorOptions))
    return [key for key in option_keys(struct) if key not in shared]


def check_executor_config(
    struct: type[ExecutorOptions] | None,
    config: Mapping[str, Any],
    *,
    environment: str,
    executor: str,
) -> None:
    """Raise ``ExecutorConfigError`` for the first key ``struct`` does not declare (with
    the closest valid key) or whose value has the wrong type. ``struct=None`` (a
    third-party adapter that declares nothing) checks nothing."""
    if struct is None:
        return
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
    where = f"environment '{environment}' ({executor})"
    for key, value in config.items():
        if key in INTERNAL_KEYS:
            continue
        field = fields.get(str(key))
        if field is None:
            raise _unknown(str(key), sorted(fields), where, executor, environment)
        if value is None:  # unset: the executor's default applies
            continue
        _check_type(key, value, field.type, where, executor, environment)


def _unknown(
    key: str, valid: list[str], where: str, executor: str, environment: str
) -> ExecutorConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return ExecutorConfigError(
        f"{where}: unknown executor_config key '{key}'{hint} Valid keys: {', '.join(valid)}",
        key=key, executor=executor, environment=environment,
        suggestion=close[0] if close else None,
    )


def _check_type(
    key: str, value: Any, expected: Any, where: str, executor: str, environment: str
) -> None:
    """The start-up check accepts exactly what ``ExecutorOptions.of`` can read."""
    try:
        _coerced(key, value, expected)
    except ValueError as exc:
        raise ExecutorConfigError(
            f"{where}: {exc}", key=key, executor=executor, environment=environment,
            suggestion=None,
        ) from None


def _coerced(key: str, value: Any, expected: Any) -> Any:
    """``value`` as one member of ``expected``: unchanged where it already is one, else
    converted the lenient way configuration sources need (``"2.5"`` -> 2.5, ``"false"``
    -> False; a path object or a number -> text for a string key), member by member:
    msgspec refuses some unions (``str | bytes``) as a whole."""
    members = _members(expected)
    for member in members:
        plain = typing.get_origin(member) or member
        if member is Any or (isinstance(plain, type) and isinstance(value, plain)
                             and not (isinstance(value, bool) and plain in (int, float))):
            return value
    for member in members:
        try:
            return msgspec.convert(value, member, strict=False)
        except (msgspec.ValidationError, TypeError):
            continue
    if _accepts(expected, str) and (isinstance(value, os.PathLike) or (
            isinstance(value, (int, float)) and not isinstance(value, bool))):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise ValueError(f"executor_config key '{key}' must be {_describe(expected)}, "
                     f"not {value!r} ({type(value).__name__})")


def _members(tp: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return tuple(arg for arg in typing.get_args(tp) if arg is not type(None))
    return (tp,)


def _accepts(tp: Any, cls: type) -> bool:
    return any((typing.get_origin(m) or m) is cls for m in _members(tp))


_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
          bytes: "bytes", dict: "a table (dict)", list: "a list", tuple: "a list"}


def _describe(tp: Any) -> str:
    """``float | None`` -> "a number"; ``int | str`` -> "an integer or a string"."""
    words = [_WORDS.get(typing.get_origin(m) or m, getattr(m, "__name__", str(m)))
             for m in _members(tp)]
    return " or ".join(dict.fromkeys(words))
