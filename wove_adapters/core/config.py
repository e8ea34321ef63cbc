"""Layered configuration, compatible with the ``wove`` 2.x configuration model.

Why layers: the same task code runs on a laptop, in CI and in production, and only the
routing differs. Values therefore come from ordered sources, highest first: ``load_config``
arguments > ``WOVE__*`` environment variables > a config file (``wove_config.py`` or
``wove_config.toml``) > built-in defaults. Tables (``environments.<name>``, ``tasks.<name>``,
``executor_config``) merge key by key, so a deployment can change one value without
restating the table. Every leaf remembers its source (``Provenance``) because "why is this
task running on Ray?" must be answerable with ``wove-adapters config``.

Key names, defaults, allowed values and messages mirror ``wove/runtime.py``; this module
must never import ``wove`` or any job-system library, and it never contacts a backend.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from wove_adapters.core.errors import redact_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SETTING_KEYS: tuple[str, ...] = (
    "executor", "executor_config", "max_workers", "background", "fork", "retries", "timeout",
    "workers", "limit_per_minute", "max_pending", "error_mode", "delivery_timeout",
    "delivery_idempotency_key", "delivery_cancel_mode", "delivery_heartbeat_seconds",
    "delivery_max_in_flight", "delivery_orphan_policy", "delivery_max_pending_seconds",
    # Task controls (docs/task-controls.md), kept by the dispatcher and the ledger.
    "concurrency_control", "registration_concurrency", "key_arguments",
    "reroute_on_concurrency_control", "concurrency_lease_seconds", "cache_results",
    "disable_cache_args", "cache_ttl_seconds", "on_diff_non_key_args_raise", "retry_for",
    "max_pending_seconds",
    # How many runs of a mapped call travel in one backend message (docs/executors.md).
    "map_chunk_size",
    # What the worker sends home besides the outcome (docs/observability.md, "Logs").
    "task_logs", "task_output",
)
# Application settings: top level only.
APP_KEYS: tuple[str, ...] = (
    "app_id", "force_local", "log_level", "log_format",
    # Traces and metrics of runs (docs/observability.md), each behind its extra.
    "tracing", "metrics",
)
CONCURRENCY_MODES = ("unlimited", "task", "arguments", "argument", "keys")
BUILTIN_DEFAULTS: dict[str, Any] = {
    "executor": "local", "executor_config": {}, "max_workers": 256, "background": False,
    "fork": False, "retries": 0, "timeout": None, "workers": None, "limit_per_minute": None,
    "max_pending": None, "error_mode": "raise", "delivery_timeout": None,
    "delivery_idempotency_key": None, "delivery_cancel_mode": "best_effort",
    "delivery_heartbeat_seconds": None, "delivery_max_in_flight": None,
    "delivery_orphan_policy": None,  # the runtime treats None as "cancel"
    "delivery_max_pending_seconds": None,
    "concurrency_control": "unlimited", "registration_concurrency": "unlimited",
    "key_arguments": None, "reroute_on_concurrency_control": False,
    "concurrency_lease_seconds": 15.0, "cache_results": False, "disable_cache_args": None,
    "cache_ttl_seconds": None, "on_diff_non_key_args_raise": False, "retry_for": None,
    "max_pending_seconds": None, "map_chunk_size": "auto",
    "task_logs": None, "task_output": False,  # None: no capture (off)
    "ledger": None,  # the runtime falls back to a per-user SQLite file
    "app_id": None, "force_local": False, "log_level": None, "log_format": "text",
    "tracing": False, "metrics": None,
}
# `Any` keys accept objects (an executor instance, an idempotency-key callable) untouched.
_TYPES: dict[str, Any] = {
    "executor": Any, "executor_config": dict, "max_workers": int, "background": bool,
    "fork": bool, "retries": int, "timeout": float, "workers": int, "limit_per_minute": int,
    "max_pending": int, "error_mode": str, "delivery_timeout": float,
    "delivery_idempotency_key": Any, "delivery_cancel_mode": str,
    "delivery_heartbeat_seconds": float, "delivery_max_in_flight": int,
    "delivery_orphan_policy": str, "delivery_max_pending_seconds": float, "ledger": str,
    "default_environment": str, "environment": str,
    "concurrency_control": str, "registration_concurrency": str, "key_arguments": list[str],
    "reroute_on_concurrency_control": bool, "concurrency_lease_seconds": float,
    "cache_results": bool, "disable_cache_args": list[str], "cache_ttl_seconds": float,
    "on_diff_non_key_args_raise": bool, "retry_for": list[str], "max_pending_seconds": float,
    "map_chunk_size": Any, "task_logs": Any, "task_output": bool,
    "app_id": str, "force_local": bool, "log_level": str, "log_format": str,
    "tracing": bool, "metrics": Any,
}
_ALLOWED: dict[str, tuple[str, ...]] = {
    "error_mode": ("raise", "return"),
    "delivery_cancel_mode": ("best_effort", "require_ack"),
    "delivery_orphan_policy": ("cancel", "detach", "fail", "requeue"),
    "concurrency_control": CONCURRENCY_MODES,
    "registration_concurrency": CONCURRENCY_MODES,
    "log_format": ("text", "json"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
}
_ENV_KEYS = (*SETTING_KEYS, "ledger")
_TASK_KEYS = (*SETTING_KEYS, "environment")
_TABLES = ("environments", "tasks")
_TOP_KEYS = (
    "default_environment", *_TABLES, "task_defaults", "ledger", *APP_KEYS, *SETTING_KEYS
)
_ENV_PREFIX = "WOVE__"
_FILE_NAMES = ("wove_config.py", "wove_config.toml")
_SECRET_WORDS = ("secret", "password", "token")
_ARGUMENT_DETAIL = "Hub(...)/load_config argument"
_DELETE = object()  # an assignment that removes a subtree (None in a source means "unset")

Path_ = tuple[str, ...]


@dataclass(frozen=True)
class Provenance:
    """Where one resolved value came from: kind is argument/environment/file/default."""

    kind: str
    detail: str


_BUILTIN = Provenance("default", "built-in default")


def _overlay(levels: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack setting levels, lowest first; None inherits from below.

    ``executor_config`` merges key by key, except that a level switching to a *different*
    executor starts from an empty one: options of a Celery executor mean nothing to Ray.
    """
    result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BUILTIN_DEFAULTS.items()}
    for level in levels:
        new_executor = level.get("executor")
        if new_executor is not None and new_executor != result["executor"]:
            result["executor_config"] = {}
        for key, value in level.items():
            if value is None or key not in BUILTIN_DEFAULTS:
                continue
            result[key] = _merge(result[key], value) if key == "executor_config" else value
    result["executor_config"] = _copy(result["executor_config"])  # callers may mutate it
    return result


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        both = isinstance(value, Mapping) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def _copy(value: Any) -> Any:
    """Copy nested dicts but keep leaves (executor objects need not be deep-copyable)."""
    return {k: _copy(v) for k, v in value.items()} if isinstance(value, dict) else value


@dataclass(frozen=True)
class Config:
    """The merged configuration plus the source of every value; read-only by convention."""

    default_environment: str
    environments: dict[str, dict[str, Any]]
    defaults: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    ledger: str | None
    source_file: Path | None
    provenance: dict[Path_, Provenance] = field(default_factory=dict, repr=False)
    # Settings for every task, between the global defaults and an environment's own.
    task_defaults: dict[str, Any] = field(default_factory=dict)

    def source_of(self, *path: str) -> Provenance:
        """Where the value at ``path`` came from, e.g. ``("environments", "r", "executor")``."""
        if path in self.provenance:
            return self.provenance[path]
        if len(path) == 1 and path[0] in BUILTIN_DEFAULTS:
            return _BUILTIN
        raise KeyError(f"No configuration value at {'.'.join(path)!r}")

    def resolve_environment_name(
        self, task_environment: str | None = None, call_environment: str | None = None
    ) -> str:
        """Task-level beats call-level beats ``default_environment`` (as in wove)."""
        return task_environment or call_environment or self.default_environment or "default"

    def environment_settings(self, name: str) -> dict[str, Any]:
        """Every setting for ``name``: its definition over global defaults over built-ins."""
        return _overlay([self.defaults, self.task_defaults, self._definition(name)])

    def task_settings(
        self,
        task_name: str | None,
        *,
        environment: str | None = None,
        call_overrides: Mapping[str, Any] | None = None,
        task_overrides: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Settings for one task: task overrides > call > tasks table > environment >
        global > built-in levels.

        What the program says at the call site (``task_options``, then call settings such
        as ``hub.map(..., delivery_timeout=5)``) beats every configured level, including
        the ``tasks.<name>`` table of a file: an explicit argument is never silently ignored.
        """
        call = dict(call_overrides or {})
        table = self.tasks.get(task_name or "", {})
        overrides = dict(task_overrides or {})
        levels = (("call overrides", call), (f"task '{task_name}' overrides", overrides))
        for where, level in levels:
            for key, value in level.items():
                _check_value(key, value, (*_TASK_KEYS, "ledger"), where, _ARGUMENT_DETAIL)
        name = self.resolve_environment_name(
            overrides.get("environment") or environment or call.get("environment"),
            table.get("environment"),
        )
        settings = _overlay(
            [self.defaults, self.task_defaults, self._definition(name), table, call, overrides]
        )
        return {"environment": name, **settings}

    def to_dict(self) -> dict[str, Any]:
        """The merged values as plain data (built-in defaults filled in at top level)."""
        return {
            "default_environment": self.default_environment,
            **_copy(self.defaults),
            "environments": _copy(self.environments),
            "tasks": _copy(self.tasks),
            "task_defaults": _copy(self.task_defaults),
        }

    def _definition(self, name: str) -> dict[str, Any]:
        if name not in self.environments:
            known = ", ".join(sorted(self.environments))
            raise NameError(f"Environment '{name}' is not configured. Known: {known}")
        return self.environments[name]


# ---------------------------------------------------------------- validation & flattening

def _unknown_key(key: str, known: Iterable[str], where: str, detail: str) -> ValueError:
    """A typo should fail loudly with the fix, not be silently ignored as wove does."""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ValueError(f"Unknown configuration key '{key}' in {where} (from {detail}).{hint}")


def _check_value(key: str, value: Any, known: Iterable[str], where: str, detail: str) -> Any:
    """Validate one non-table value; returns it converted (e.g. ``5`` -> ``5.0`` for floats)."""
    if key not in known:
        raise _unknown_key(key, known, where, detail)
    expected = _TYPES[key]
    if key == "task_logs":  # a level name, true or "off": one spelling from here on
        from wove_adapters.core.policies import task_logs_setting

        return task_logs_setting(value, f"{where} (from {detail})")
    if value is None or expected is Any:
        return value
    if expected is dict:  # executor_config: kept raw until the executor's own config checks it
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} in {where} must be a dict, got {value!r} (from {detail})")
        return value
    if key == "log_level" and isinstance(value, str):
        value = value.upper()
    try:
        value = msgspec.convert(value, expected)
    except msgspec.ValidationError:
        raise ValueError(
            f"{key} in {where} must be of type {expected.__name__}, got {value!r} "
            f"(from {detail})"
        ) from None
    if key in _ALLOWED and value not in _ALLOWED[key]:
        allowed = "', '".join(_ALLOWED[key])
        raise ValueError(
            f"Invalid {key} {value!r} in {where} (from {detail}). Expected one of: '{allowed}'."
        )
    return value


Assignment = tuple[Path_, Any, Provenance]


def _flatten_settings(
    prefix: Path_, table: Mapping[str, Any], known: Iterable[str], where: str, prov: Provenance
) -> list[Assignment]:
    """Validate one table of setting keys; None becomes _DELETE so lower sources show."""
    out: list[Assignment] = []
    for key, value in table.items():
        if key == "config" and prefix[:1] == ("environments",):  # wove's alias
            key = "executor_config"
        if key == "executor_config" and value is not None:
            _check_value(key, value, known, where, prov.detail)
            out.extend(_flatten_leaves((*prefix, key), value, prov))
            continue
        value = _check_value(key, value, known, where, prov.detail)
        out.append(((*prefix, key), _DELETE if value is None else value, prov))
    return out


def _flatten_leaves(prefix: Path_, table: Mapping[str, Any], prov: Provenance) -> list[Assignment]:
    """One assignment per leaf, which is what makes tables merge key by key across sources."""
    if not table:
        return [(prefix, {}, prov)]
    out: list[Assignment] = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.extend(_flatten_leaves((*prefix, str(key)), value, prov))
        else:
            out.append(((*prefix, str(key)), value, prov))
    return out


def _flatten(source: Mapping[str, Any], prov: Provenance) -> list[Assignment]:
    """Turn one source's nested dict into validated leaf assignments."""
    if not isinstance(source, Mapping):
        raise TypeError(f"Configuration from {prov.detail} must be a dict.")
    out: list[Assignment] = []
    for key, value in source.items():
        if key == "task_defaults":
            if value is None:
                out.append((("task_defaults",), _DELETE, prov))
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"task_defaults must be a dict (from {prov.detail})")
            out.append((("task_defaults",), {}, prov))
            out.extend(
                _flatten_settings(("task_defaults",), value, SETTING_KEYS, "task_defaults", prov)
            )
        elif key in ("environments", "tasks"):
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise TypeError(f"{key} must be a dict[str, dict] (from {prov.detail})")
            for name, definition in value.items():
                where = f"environment '{name}'" if key == "environments" else f"task '{name}'"
                if definition is None:
                    out.append(((key, name), _DELETE, prov))
                    continue
                if not isinstance(definition, Mapping):
                    raise TypeError(f"{where.capitalize()} must be a dict (from {prov.detail}).")
                known = _ENV_KEYS if key == "environments" else _TASK_KEYS
                out.append(((key, name), {}, prov))
                out.extend(_flatten_settings((key, name), definition, known, where, prov))
        else:
            out.extend(_flatten_settings((), {key: value}, _TOP_KEYS, "global defaults", prov))
    return out


def _apply(tree: dict[str, Any], prov: dict[Path_, Provenance], item: Assignment) -> None:
    """Apply one assignment; ``{}`` only ensures a table exists, _DELETE removes a subtree."""
    path, value, source = item
    node = tree
    for depth, part in enumerate(path[:-1], start=1):
        if not isinstance(node.get(part), dict):
            node[part] = {}
            prov.pop(path[:depth], None)  # a scalar replaced by a table has no source any more
        node = node[part]
    if isinstance(value, dict) and not value and isinstance(node.get(path[-1]), dict):
        return
    for stale in [p for p in prov if p[: len(path)] == path]:
        del prov[stale]
    if value is _DELETE:
        node.pop(path[-1], None)
        return
    node[path[-1]] = value
    prov[path] = source


# ---------------------------------------------------------------- sources

def _parse_env_value(var: str, path: Path_, raw: str) -> Any:
    """Parse a variable's text to the key's type; executor_config values try JSON first.

    Typed keys go through msgspec's lax mode ("30" -> 30, "true" -> True), so the rules are
    a library's, not hand-written; "none", "null" and "" unset the key.
    """
    if "executor_config" in path:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    if raw.strip().lower() in ("none", "null", ""):
        return None
    expected = _TYPES.get(path[-1], Any)
    if expected is Any:
        return raw
    if expected == list[str]:  # JSON, or names separated by commas
        try:
            return json.loads(raw)
        except ValueError:
            return [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return msgspec.convert(raw, expected, strict=False)
    except msgspec.ValidationError:
        raise ValueError(f"{var}={raw!r} is not a valid {expected.__name__}") from None


def _env_assignments(environ: Mapping[str, str], names: dict[str, set[str]]) -> list[Assignment]:
    """``WOVE__A__B__C=v`` -> ``{"a": {"b": {"c": v}}}``, one source per variable."""
    out: list[Assignment] = []
    for var in sorted(environ):
        if not var.upper().startswith(_ENV_PREFIX):
            continue
        parts = [p.lower() for p in var[len(_ENV_PREFIX):].split("__")]
        if parts[0] == "task" and len(parts) > 1:  # the seed's WOVE__TASK__<NAME>__<FIELD>
            parts[0] = "tasks"
        if parts[0] in ("environments", "tasks") and len(parts) > 1:
            by_lower = {n.lower(): n for n in sorted(names[parts[0]])}
            parts[1] = by_lower.get(parts[1], parts[1])
            if len(parts) == 2:  # only "unset this table" makes sense for a whole table
                if environ[var].strip().lower() not in ("none", "null", ""):
                    raise ValueError(f"{var} can only be set to 'none' (removes the table)")
                out.append(((parts[0], parts[1]), _DELETE, Provenance("environment", var)))
                continue
        source: Any = _parse_env_value(var, tuple(parts), environ[var])
        for part in reversed(parts):
            source = {part: source}
        out.extend(_flatten(source, Provenance("environment", var)))
    return out


def _find_file(cwd: Path, explicit: str | os.PathLike[str] | None) -> Path | None:
    """Which config file to read.

    - A path (anything with a directory part, ``./x.toml`` included) is relative to cwd,
      must exist, and is never searched for: ``--config ./x.toml`` that silently picked a
      parent's ``x.toml`` would run a job with somebody else's settings.
    - A bare file name is searched upwards from cwd, as wove does.
    - Nothing: the nearest directory upwards holding wove_config.py or wove_config.toml
      wins (the .py file first), so a project's own file is never shadowed by a parent's.
    """
    raw = os.fspath(explicit) if explicit is not None else None
    if raw is not None and (os.sep in raw or "/" in raw or raw.startswith("~")):
        resolved = cwd / Path(raw).expanduser()  # an absolute path replaces cwd
        if not resolved.is_file():
            raise FileNotFoundError(
                f"Config file not found: {resolved} (a config path is taken relative to "
                f"the working directory {cwd}, never searched for)"
            )
        return resolved
    names = _FILE_NAMES if raw is None else (raw,)
    for directory in (cwd, *cwd.parents):
        for name in names:
            if (directory / name).is_file():
                return directory / name
    if raw is not None:
        raise FileNotFoundError(
            f"Config file not found: {raw} (searched from {cwd} upwards; give a path such as "
            f"./{raw} to name one file exactly)"
        )
    return None


def _read_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".toml":
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"Config file {path} is not valid TOML: {exc}") from None
    if path.suffix != ".py":
        raise ValueError(f"Config file {path} must be a .py or .toml file")
    spec = importlib.util.spec_from_file_location(f"_wove_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"Could not load config file: {path}")
    module = importlib.util.module_from_spec(spec)
    _loading.depth = getattr(_loading, "depth", 0) + 1
    try:
        spec.loader.exec_module(module)
    finally:
        _loading.depth -= 1
    if hasattr(module, "WOVE_CONFIG"):
        data = module.WOVE_CONFIG
        if not isinstance(data, dict):
            raise TypeError(f"WOVE_CONFIG in {path} must be a dictionary.")
        return data
    return {key: getattr(module, key) for key in _TOP_KEYS if hasattr(module, key)}


_loading = threading.local()


def loading_config() -> bool:
    """True while a ``wove_config.py`` runs on this thread: code in that file (such as
    ``integration.wove.executor(...)``) must not load the configuration again, or the
    file would run itself without end."""
    return getattr(_loading, "depth", 0) > 0


def load_config(
    config: Mapping[str, Any] | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    **overrides: Any,
) -> Config:
    """Merge arguments > ``WOVE__*`` variables > config file > built-in defaults.

    A keyword override of None means "not given" (as in ``wove.config``); a None inside a
    dict, file or variable unsets the key so lower sources show through, and a None
    environment/task table removes it.
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else Path(cwd).absolute()
    path = _find_file(cwd, config_file or environ.get("WOVE_CONFIG_FILE") or None)
    file_items = _flatten(_read_file(path), Provenance("file", str(path))) if path else []
    argument = Provenance("argument", _ARGUMENT_DETAIL)
    arg_items = _flatten(config or {}, argument)
    arg_items += _flatten({k: v for k, v in overrides.items() if v is not None}, argument)
    names = {table: {p[1] for p, _, _ in (*file_items, *arg_items) if p[0] == table and p[1:]}
             for table in ("environments", "tasks")}
    tree: dict[str, Any] = {}
    prov: dict[Path_, Provenance] = {}
    builtins: list[Assignment] = [
        (("default_environment",), "default", _BUILTIN), (("tasks",), {}, _BUILTIN),
        (("task_defaults",), {}, _BUILTIN),
        (("environments", "default", "executor"), "local", _BUILTIN)]
    for item in (*builtins, *file_items, *_env_assignments(environ, names), *arg_items):
        _apply(tree, prov, item)
    # A source may unset default_environment or remove environments.default; wove restores both.
    if "default_environment" not in tree:
        _apply(tree, prov, builtins[0])
    if "default" not in tree["environments"]:
        _apply(tree, prov, builtins[-1])
    defaults = _overlay([tree])  # top-level setting keys; tables are skipped by _overlay
    return Config(
        default_environment=tree["default_environment"], environments=tree["environments"],
        defaults=defaults, tasks=tree["tasks"], ledger=defaults["ledger"], source_file=path,
        task_defaults=tree.get("task_defaults") or {},
        provenance=prov,
    )


# ---------------------------------------------------------------- rendering

def _redact(path: Path_, value: Any) -> Any:
    """Hide secrets: sensitive executor_config keys and passwords inside URLs."""
    inner = path[path.index("executor_config") + 1:] if "executor_config" in path else ()
    if any(word in part.lower() for part in inner for word in _SECRET_WORDS):
        return "***"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return value


def _leaves(value: Any, path: Path_ = ()) -> Iterable[tuple[Path_, Any]]:
    if isinstance(value, dict) and value:
        for key, child in value.items():
            yield from _leaves(child, (*path, str(key)))
    else:
        yield path, value


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{" + (f" {inner} " if inner else "") + "}"
    text = value if isinstance(value, str) else repr(value)  # objects show as their repr
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def render_config(cfg: Config, *, environment: str | None = None, fmt: str = "toml") -> str:
    """Render merged values and the source of every leaf, for ``wove-adapters config``.

    With ``environment``, shows that environment's *resolved* settings, each attributed to
    the level it came from (environment definition, global default or built-in).
    """
    if environment is None:
        values = cfg.to_dict()
        sources = {p: cfg.provenance.get(p, _BUILTIN) for p, _ in _leaves(values)}
    else:  # a resolved leaf comes from the definition, else the global default, else built-in
        values = {"environments": {environment: cfg.environment_settings(environment)}}
        prov = cfg.provenance
        sources = {p: prov.get(p) or prov.get(p[2:]) or _BUILTIN for p, _ in _leaves(values)}
    leaves = [(p, _redact(p, v), sources[p], None) for p, v in _leaves(values)]
    title = f"# Merged wove-adapters configuration (file: {cfg.source_file or 'none found'})"
    return render_leaves(title, leaves, fmt)


# (path, value already redacted, its source, the level that set it or None)
Leaf = tuple[Path_, Any, Provenance, str | None]


def render_leaves(title: str, leaves: Sequence[Leaf], fmt: str) -> str:
    """Values with the source of each, as TOML with ``# from`` comments under ``title`` or
    as JSON (``values`` and ``sources``): the one renderer of ``config`` and
    ``config --task``."""
    if fmt == "json":
        nested: dict[str, Any] = {}
        for p, v, _, _ in leaves:
            _apply(nested, {}, (p, v, _BUILTIN))
        return json.dumps({
            "values": nested,
            "sources": {
                ".".join(p): {"kind": s.kind, "detail": s.detail,
                              **({"level": level} if level is not None else {})}
                for p, _, s, level in leaves
            },
        }, indent=2, default=repr)
    if fmt != "toml":
        raise ValueError(f"Unknown format {fmt!r}; expected 'toml' or 'json'")
    lines = [title]
    by_table: dict[Path_, list[str]] = {}
    for path, value, source, level in leaves:
        table, key = path[:-1], path[-1]
        comment = f"# from {_source_label(source, level)}"
        line = (f"# {_toml_key(key)} is unset (None)  {comment}" if value is None
                else f"{_toml_key(key)} = {_toml_value(value)}  {comment}")
        by_table.setdefault(table, []).append(line)
    for table in sorted(by_table, key=lambda t: (len(t) > 0, t)):
        if table:
            lines += ["", "[" + ".".join(_toml_key(p) for p in table) + "]"]
        lines += by_table[table]
    return "\n".join(lines) + "\n"


def _source_label(source: Provenance, level: str | None) -> str:
    where = {"environment": source.detail, "file": f"file {source.detail}"}
    if level is None:
        return where.get(source.kind, source.kind)
    if source.kind == "default":
        return "default"
    return f"{where.get(source.kind, source.kind)} ({level})"
