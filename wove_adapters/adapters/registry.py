"""Every executor name, where its class lives, and the extra that installs its library.

One read-only view, ``EXECUTORS`` (name -> ``Where``), alphabetized, answers "what can
``executor = ...`` name?" for the whole package: the two executors built into ``core``
(``local``, ``stdio``), the backend adapters shipped here, adapters registered in this
process (``register_adapter``) and third-party adapters installed under the entry-point
group ``wove_adapters.adapters``. Targets are strings, so nothing is imported until a name
is used; entry points are read the first time a name is not found elsewhere (or the
whole view is listed), so a process that only uses built-ins never scans them.

The core executors are ``local``, ``stdio`` and the network clients ``http``, ``https``,
``grpc`` and ``websocket`` (they talk to ``wove-adapters serve``).

Precedence: the core executors' names always mean them; then an explicit
registration, then the built-ins, then entry points. A missing backend library becomes
one ``MissingBackendError`` naming the ``wove-adapters[extra]`` to install.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from importlib import metadata
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from wove_adapters.adapters.base import BackendAdapter
from wove_adapters.adapters.transport import AdapterTransport
from wove_adapters.core.errors import MissingBackendError
from wove_adapters.core.transport import Transport

ENTRY_POINT_GROUP: Final = "wove_adapters.adapters"


class Where(NamedTuple):
    """Where an executor's class lives (``"module:Class"``, or the class itself when it
    was registered as an object) and the pip extra that brings its backend library
    (empty: nothing beyond the base install)."""

    target: str | type[BackendAdapter]
    extra: str


# The executors built into core: transports of their own, not backend adapters. The
# network executors talk to a Wove-compatible worker service (`wove-adapters serve`);
# grpc needs grpcio (imported when its environment starts).
_CORE: Final[Mapping[str, Where]] = MappingProxyType({
    "grpc": Where("wove_adapters.core.executors.network_grpc:GrpcTransport", "grpc"),
    "http": Where("wove_adapters.core.executors.network:HttpTransport", ""),
    "https": Where("wove_adapters.core.executors.network:HttpsTransport", ""),
    "local": Where("wove_adapters.core.executors.local:LocalTransport", ""),
    "stdio": Where("wove_adapters.core.executors.stdio:StdioTransport", ""),
    "websocket": Where("wove_adapters.core.executors.network:WebSocketTransport", ""),
})
# The backend adapters shipped in this package. Alphabetized.
_BUILTINS: Final[Mapping[str, Where]] = MappingProxyType({
    "arq": Where("wove_adapters.adapters.arq:ArqAdapter", "arq"),
    "aws_batch": Where("wove_adapters.adapters.aws_batch:AwsBatchAdapter", "aws"),
    "celery": Where("wove_adapters.adapters.celery:CeleryAdapter", "celery"),
    "dask": Where("wove_adapters.adapters.dask:DaskAdapter", "dask"),
    "kubernetes_jobs": Where(
        "wove_adapters.adapters.kubernetes_jobs:KubernetesJobsAdapter", "kubernetes"
    ),
    "process": Where("wove_adapters.adapters.process:ProcessAdapter", ""),
    "ray": Where("wove_adapters.adapters.ray:RayAdapter", "ray"),
    "rq": Where("wove_adapters.adapters.rq:RqAdapter", "rq"),
    "slurm": Where("wove_adapters.adapters.slurm:SlurmAdapter", "slurm"),
    "taskiq": Where("wove_adapters.adapters.taskiq:TaskiqAdapter", "taskiq"),
    "temporal": Where("wove_adapters.adapters.temporal:TemporalAdapter", "temporal"),
})
_registered: dict[str, type[BackendAdapter] | str] = {}
_entry_points: dict[str, str] | None = None


def register_adapter(name: str, target: type[BackendAdapter] | str) -> None:
    """Explicit registration wins over built-ins and entry points (not over the core
    executors' names: ``local``, ``stdio``, ``http``, ``https``, ``grpc``, ``websocket``)."""
    _registered[name] = target


def _load_entry_points() -> dict[str, str]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {
            ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        }
    return _entry_points


def refresh_entry_points() -> None:
    """Read the entry points again on next use (after installing a package at run time)."""
    global _entry_points
    _entry_points = None


class _Executors(Mapping[str, Where]):
    """The live, read-only view: registrations and entry points show up as they join."""

    def __getitem__(self, name: str) -> Where:
        where = _CORE.get(name)
        if where is not None:
            return where
        registered = _registered.get(name)
        if registered is not None:
            return Where(registered, str(getattr(registered, "extra", "") or ""))
        where = _BUILTINS.get(name)
        if where is not None:
            return where
        target = _load_entry_points().get(name)
        if target is None:
            raise KeyError(name)
        return Where(target, "")

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*_CORE, *_registered, *_BUILTINS, *_load_entry_points()}))

    def __len__(self) -> int:
        return len({*_CORE, *_registered, *_BUILTINS, *_load_entry_points()})

    def __repr__(self) -> str:
        return f"EXECUTORS({dict(self)!r})"


EXECUTORS: Final[Mapping[str, Where]] = _Executors()


def executor_names() -> list[str]:
    """Every name ``executor = ...`` accepts, alphabetized."""
    return list(EXECUTORS)


def adapter_names() -> list[str]:
    """The backend adapters' names (the core executors left out), alphabetized."""
    return [name for name in EXECUTORS if name not in _CORE]


def _unknown(name: str) -> ValueError:
    known = executor_names()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(
        f"Unknown executor '{name}'.{hint} Known executors: {', '.join(known)} "
        f"(third-party adapters register through the '{ENTRY_POINT_GROUP}' entry-point "
        f"group)."
    )


def import_object(spec: str, *, default: str | None = None) -> Any:
    """``"package.module:attr.path"`` -> that object: how executors, adapters and
    ``executor_config`` values (a Celery ``app``, a Taskiq ``broker``) name Python objects.
    Without ``:attr``, the ``default`` attribute path, else the module itself."""
    module_name, _, attr = spec.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in (attr or default or "").split("."):
        if part:
            found = getattr(found, part)
    return found


def _load(name: str, where: Where) -> Any:
    """The class ``where`` names; a missing third-party module it imports eagerly is the
    backend's library, so it is reported with the extra to install."""
    if not isinstance(where.target, str):
        return where.target
    try:
        return import_object(where.target)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        module_of_target = where.target.partition(":")[0]
        if missing and not module_of_target.startswith(missing):
            raise MissingBackendError(name, missing, where.extra or name) from exc
        raise


def get_adapter_class(name: str, *, require_backend: bool = True) -> type[BackendAdapter]:
    """The backend adapter registered under ``name``.

    Raises ValueError for unknown names (suggesting the closest) and for the core
    executors (they are not adapters: ``transport_for`` builds them), and
    MissingBackendError when the adapter's declared library is missing; any other import
    error is a bug in the adapter and surfaces as itself. ``require_backend=False`` skips
    the library check: adapter modules import their library lazily, so the class (and
    its ``config_struct``) can be read to check a configuration on a machine without the
    backend.
    """
    if name in _CORE:
        raise ValueError(
            f"'{name}' is an executor built into wove_adapters.core, not a backend adapter; "
            f"use wove_adapters.adapters.registry.transport_for('{name}')."
        )
    try:
        where = EXECUTORS[name]
    except KeyError:
        raise _unknown(name) from None
    cls: type[BackendAdapter] = _load(name, where)
    if require_backend:
        check_requirements(cls, where.extra)
    return cls


def check_requirements(cls: type[BackendAdapter], extra: str = "") -> None:
    """Import ``cls.required_modules``; a missing one is a MissingBackendError naming the
    extra to install: ``extra`` (the registry's, one place for the built-ins), else the
    class's own, else its name."""
    for module in cls.required_modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name.split(".")[0]):
                raise MissingBackendError(cls.name, module, extra or cls.extra or cls.name) from exc
            raise


def core_executor_class(name: str) -> type[Transport] | None:
    """The transport class of a core executor (None: ``name`` is not one). Importing it
    needs no backend library (grpc imports grpcio only when it starts), so its
    ``config_struct`` can be read to check a configuration anywhere."""
    where = _CORE.get(name)
    if where is None:
        return None
    cls: type[Transport] = _load(name, where)
    return cls


def transport_for(name: str) -> Transport:
    """A new transport for the executor ``name``: a core executor's own, or an
    ``AdapterTransport`` driving the backend adapter. Unknown names raise ValueError; a
    missing backend library raises MissingBackendError (naming the extra)."""
    where = _CORE.get(name)
    if where is not None:
        transport: Transport = _load(name, where)()
        return transport
    return AdapterTransport(get_adapter_class(name))
