"""Exceptions a caller can catch, shared by every executor and adapter.

Names match wove 2.x where wove has the same concept, so code written against wove's
errors reads the same against ours. When wove is installed, those classes also derive from
wove's own (``except wove.errors.MissingDispatchFeatureError`` catches ours); without wove
they are plain. wove is not a backend library, and it is only looked up, never required.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import TYPE_CHECKING, Any


def _wove_class(module: str, name: str) -> Any:
    """wove's class of that name, to be an extra base; without wove (or if a later wove
    moved it) an empty stand-in, so ours still work, just not also as wove's."""
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception:
        found = None
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return type(f"_NoWove{name}", (Exception,), {"__module__": __name__})


if TYPE_CHECKING:  # what wove declares them as

    class _WoveTimeout(RuntimeError): ...

    class _WoveOrphaned(RuntimeError): ...

    class _WoveDispatch(RuntimeError): ...

    class _WoveExecution(RuntimeError): ...

else:
    _WoveTimeout = _wove_class("wove.environment", "DeliveryTimeoutError")
    _WoveOrphaned = _wove_class("wove.environment", "DeliveryOrphanedError")
    _WoveDispatch = _wove_class("wove.errors", "MissingDispatchFeatureError")
    _WoveExecution = _wove_class("wove.environment", "EnvironmentExecutionError")


class WoveAdaptersError(Exception):
    """Base class: everything this package raises on purpose derives from it."""


class DeliveryTimeoutError(WoveAdaptersError, _WoveTimeout, RuntimeError):
    """No terminal event arrived within ``delivery_timeout`` (a lapsed heartbeat is a lost
    run instead: its orphan policy applies).

    A ``RuntimeError`` as wove's, not a ``TimeoutError``: wove turns any ``TimeoutError``
    escaping a task into a silent cancellation, so inside a weave the caller would never
    see this error."""


class DeliveryOrphanedError(WoveAdaptersError, _WoveOrphaned, RuntimeError):
    """A run was lost (worker died, heartbeat lapsed, shutdown) and its policy is ``fail``."""

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class DeliveryDetachedError(DeliveryOrphanedError):
    """A lost run under ``detach``: the job keeps running and the ledger keeps its result.

    ``run_id`` is the handle: ``hub.result(run_id)`` or ``wove-adapters result RUN_ID``
    fetches the outcome once the worker records it.
    """

    def __init__(self, message: str, *, run_id: str, ledger: str | None = None) -> None:
        super().__init__(message, run_id=run_id)
        self.ledger = ledger

    def __reduce__(self) -> Any:
        return (_rebuild_detached, (str(self), self.run_id, self.ledger))


def _rebuild_detached(message: str, run_id: str, ledger: str | None) -> DeliveryDetachedError:
    return DeliveryDetachedError(message, run_id=run_id, ledger=ledger)


class BackendUnavailableError(WoveAdaptersError, ConnectionError):
    """A run could not be handed to its backend: the broker, server or scheduler did not
    answer at the address configured for the environment.

    The message names the environment, the executor, the address (password redacted) and
    the setting to check; ``__cause__`` is the backend library's own error, whose text the
    message repeats. The run never reached the backend, so retrying it is safe.
    """

    def __init__(
        self,
        message: str = "",
        *,
        environment: str = "",
        executor: str = "",
        address: str | None = None,
        setting: str | None = None,
    ) -> None:
        super().__init__(message)
        self.environment = environment
        self.executor = executor
        self.address = address
        self.setting = setting

    def __reduce__(self) -> Any:
        # Rebuilt with its fields in another process (outcomes travel pickled).
        return (
            _rebuild_unavailable,
            (str(self), self.environment, self.executor, self.address, self.setting),
        )


def _rebuild_unavailable(
    message: str, environment: str, executor: str, address: str | None, setting: str | None
) -> BackendUnavailableError:
    return BackendUnavailableError(
        message, environment=environment, executor=executor, address=address, setting=setting
    )


class CancelNotAcknowledgedError(WoveAdaptersError, RuntimeError):
    """``require_ack`` cancellation: nobody confirmed the cancel within the ack window."""


class MissingDispatchFeatureError(WoveAdaptersError, _WoveDispatch, ImportError):
    """cloudpickle is missing, so callables cannot be shipped to another process."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason  # as wove's
        why = f" ({reason})" if reason else ""
        # ImportError's own __init__: wove's would wrap our message in its own advice.
        ImportError.__init__(
            self,
            "Dispatching tasks to another process needs cloudpickle, which is not installed"
            f"{why}. Install it with: pip install 'wove-adapters' (or pip install cloudpickle).",
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.reason,))


class MissingBackendError(WoveAdaptersError, ImportError):
    """The job-system library behind an adapter is not installed."""

    def __init__(self, adapter: str, module: str, extra: str) -> None:
        super().__init__(
            f"The '{adapter}' adapter needs the Python module '{module}', which is not "
            f"installed. Install it with: pip install 'wove-adapters[{extra}]'"
        )
        self.adapter = adapter
        self.module = module
        self.extra = extra


class ExecutorConfigError(WoveAdaptersError, ValueError):
    """An ``executor_config`` key the executor does not declare (a typo would otherwise
    be ignored silently), or a value of the wrong type. Raised when the environment
    starts, before anything connects or is submitted; ``suggestion`` is the closest valid
    key, if any."""

    def __init__(
        self,
        message: str,
        *,
        key: str,
        executor: str,
        environment: str,
        suggestion: str | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.executor = executor
        self.environment = environment
        self.suggestion = suggestion


class UnsupportedPolicyError(WoveAdaptersError, ValueError):
    """A delivery policy asks for something the adapter declared it cannot do."""


class PayloadError(WoveAdaptersError, ValueError):
    """A payload or event failed verification (signature, digest, version, size)."""


class ArgumentsConflictError(WoveAdaptersError, ValueError):
    """``on_diff_non_key_args_raise``: a call matched an existing run or cached result by
    its key arguments but differs in the others, so the other run's result would not be
    this call's. ``this`` and ``other`` show both argument sets; ``run_id`` is the other
    run."""

    def __init__(self, message: str, *, run_id: str = "", this: str = "", other: str = "") -> None:
        super().__init__(message)
        self.run_id, self.this, self.other = run_id, this, other

    def __reduce__(self) -> Any:
        return (_rebuild_conflict, (str(self), self.run_id, self.this, self.other))


def _rebuild_conflict(message: str, run_id: str, this: str, other: str) -> ArgumentsConflictError:
    return ArgumentsConflictError(message, run_id=run_id, this=this, other=other)


class TaskExecutionError(WoveAdaptersError, _WoveExecution, RuntimeError):
    """A task failed remotely and its original exception could not be rebuilt here.

    ``payload`` is the normalized error: ``kind``, ``message``, ``traceback``,
    ``retryable``, ``source``.
    """

    def __init__(self, payload: dict[str, Any]) -> None:
        self.payload = payload
        kind = payload.get("kind", "Error")
        RuntimeError.__init__(self, f"{kind}: {payload.get('message', 'task failed')}")
        self.kind = kind
        self.remote_traceback = payload.get("traceback", "")

    def __reduce__(self) -> Any:
        return (type(self), (self.payload,))


class WorkerImportError(WoveAdaptersError, ImportError):
    """The worker could not import what the task needs (its module, or a class of an
    argument): the code exists in the caller but not where the task runs.

    Raised on the worker while it unpickles the task, so the message says where it
    happened (``backend``, ``host``, ``pid``) and the fix: install the module on the
    workers, or put its directory on the worker's ``PYTHONPATH``. ``module`` is the
    missing module's name when Python reported one.
    """

    def __init__(
        self,
        message: str,
        *,
        backend: str = "",
        host: str = "",
        pid: int | None = None,
        module: str | None = None,
    ) -> None:
        super().__init__(message, name=module)
        self.backend = backend
        self.host = host
        self.pid = pid
        self.module = module


# Query parameters whose values are secrets (``?password=...``, ``&token=...``).
_SECRET_PARAMS = re.compile(
    r"([?&;](?:[^=&;#\s]*(?:pass|secret|token|credential)[^=&;#\s]*)=)"
    r"([^&;#\s]*)",
    re.IGNORECASE,
)
# The receiver's path token: whoever has it can reach the receiver's run table.
_PATH_TOKEN = re.compile(r"(/wove/events/)[^/?#\s]+")


def _split_credentials(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, user, password or "", rest) when ``url`` names credentials. The last
    ``@`` before the path ends them, so a raw password holding ``/`` or ``@`` (a user
    who did not percent-encode it) is found whole."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return None
    credentials, _, host = rest.rpartition("@")
    user, colon, password = credentials.partition(":")
    if "/" in user:
        return None  # an "@" in a path (sqlite:////tmp/a@b/runs.db): no credentials
    return scheme, user, password if colon else "", host


def redact_url(url: object) -> str:
    """A URL without its secrets (``redis://:***@host``, ``?password=***``, the
    receiver's path token), for messages, logs and ``wove-adapters config``: every error
    and doctor row that names a backend's address goes through here. None (a setting
    left unset) reads as empty."""
    url = "" if url is None else str(url)
    parts = _split_credentials(url)
    if parts is not None:
        scheme, user, password, host = parts
        url = f"{scheme}://{user}:***@{host}" if password else f"{scheme}://{user}@{host}"
    url = _SECRET_PARAMS.sub(r"\1***", url)
    return _PATH_TOKEN.sub(r"\1***", url)


def strip_credentials(url: str | None) -> str | None:
    """The URL without its password and secret query parameters (the user name stays):
    what may travel in a payload. The worker adds the credentials from its own
    configuration (``WOVE_ADAPTERS_LEDGER``, see ``ledger_url_for_worker``)."""
    if not url:
        return url
    parts = _split_credentials(url)
    if parts is not None:
        scheme, user, _, host = parts
        url = f"{scheme}://{user}@{host}" if user else f"{scheme}://{host}"
    base, question, query = url.partition("?")
    if not question:
        return url
    kept = [part for part in query.split("&") if not _SECRET_PARAMS.match("?" + part)]
    return f"{base}?{'&'.join(kept)}" if kept else base


def ledger_url_for_worker(url: str | None) -> str | None:
    """The ledger a worker writes to, given the credential-free URL its payload names:
    the worker's own ``WOVE_ADAPTERS_LEDGER`` when it is the same ledger (its credentials
    are the worker's configuration, never the payload's), else the URL as given."""
    own = os.environ.get("WOVE_ADAPTERS_LEDGER")
    if url and own and strip_credentials(own) == url:
        return own
    return url
