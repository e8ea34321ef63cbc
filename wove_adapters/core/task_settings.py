"""One task's resolved settings and where each came from (``wove-adapters config --task``).

Why: with four levels a task setting can come from (``tasks.<name>``, the task's
environment, ``task_defaults``, the top level) and four sources each level can come from
(argument, ``WOVE__`` variable, file, built-in), "why does this task retry three times?"
needs the answer per key, not the merged tables. The levels and their order are
``Config.task_settings``'s; this module only attributes each resolved value to the
highest level that set it, and renders it in ``render_config``'s formats.
"""

from __future__ import annotations

from typing import Any

from wove_adapters.core.config import (
    _BUILTIN,
    Config,
    Path_,
    Provenance,
    _leaves,
    _redact,
    render_leaves,
)

__all__ = ["render_task", "task_sources"]


def _levels(task: str, environment: str) -> list[Path_]:
    """Where a task's setting may live, highest first (as ``Config.task_settings``)."""
    return [("tasks", task), ("environments", environment), ("task_defaults",), ()]


def _level_name(level: Path_) -> str:
    return ".".join(level) if level else "top level"


def task_sources(
    cfg: Config, task: str, *, environment: str | None = None
) -> tuple[dict[str, Any], dict[Path_, tuple[Provenance, str]]]:
    """``(settings, sources)``: the task's resolved settings (``environment`` included),
    and for every leaf (keyed by its path inside ``settings``) its source and the level
    that set it (``tasks.<name>``, ``environments.<env>``, ``task_defaults``,
    ``top level``, or ``built-in``).

    ``environment`` is the call site's (``--environment``), which beats the task table's,
    as ``Hub.run(..., environment=...)`` does."""
    settings = cfg.task_settings(task, environment=environment)
    name = settings["environment"]
    prov = cfg.provenance
    sources: dict[Path_, tuple[Provenance, str]] = {}
    levels = _levels(task, name)
    for path, _ in _leaves(settings):
        if path == ("environment",):
            if environment is not None:
                sources[path] = (Provenance("argument", "--environment"), "call site")
            elif ("tasks", task, "environment") in prov:
                sources[path] = (prov[("tasks", task, "environment")], f"tasks.{task}")
            else:
                sources[path] = (prov.get(("default_environment",), _BUILTIN),
                                 "default_environment")
            continue
        sources[path] = (_BUILTIN, "built-in")
        for level in levels:
            where = level + path
            if where in prov:
                sources[path] = (prov[where], _level_name(level))
                break
    return settings, sources


def render_task(
    cfg: Config, task: str, *, environment: str | None = None, fmt: str = "toml"
) -> str:
    """The task's resolved settings as ``[tasks.<name>]``, each with its source and the
    level that set it, in ``render_config``'s formats (``toml`` with ``# from`` comments,
    or ``json`` with ``values`` and ``sources``); secrets redacted the same way."""
    settings, sources = task_sources(cfg, task, environment=environment)
    prefix: Path_ = ("tasks", task)
    leaves = [(prefix + p, _redact(prefix + p, v), sources[p][0], sources[p][1])
              for p, v in _leaves(settings)]
    title = f"# Task {task!r}, resolved (file: {cfg.source_file or 'none found'})"
    return render_leaves(title, leaves, fmt)
