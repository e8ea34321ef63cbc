"""Precedence of configuration sources and levels, in one place (as pydantic-settings does).

Sources, highest first: load_config argument > WOVE__* variable > config file > built-in.
Levels for one task: task overrides > call overrides > tasks table > environment > global.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core.config import BUILTIN_DEFAULTS, Config, Provenance, load_config

SOURCES = ("argument", "environment", "file", "default")  # highest first


pytestmark = pytest.mark.usefixtures("isolated_config")


def nested(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    for part in reversed(path):
        value = {part: value}
    return value


def write_py(directory: Path, config: dict[str, Any], name: str = "wove_config.py") -> Path:
    path = directory / name
    path.write_text(f"WOVE_CONFIG = {config!r}\n")
    return path


@dataclass(frozen=True)
class Scope:
    """One place a value can live, the value each source writes there, and how to read it."""

    name: str
    path: tuple[str, ...]
    env_var: str
    values: dict[str, Any]  # source kind -> value as that source writes it
    expected: dict[str, Any]  # source kind -> resolved value
    read: Callable[[Config], Any]


SCOPES = [
    Scope("top-level", ("retries",), "WOVE__RETRIES",
          {"file": 1, "environment": "2", "argument": 3},
          {"file": 1, "environment": 2, "argument": 3, "default": 0},
          lambda c: c.defaults["retries"]),
    Scope("environment key (built-in env)", ("environments", "default", "executor"),
          "WOVE__ENVIRONMENTS__DEFAULT__EXECUTOR",
          {"file": "file-exec", "environment": "env-exec", "argument": "arg-exec"},
          {"file": "file-exec", "environment": "env-exec", "argument": "arg-exec",
           "default": "local"},
          lambda c: c.environment_settings("default")["executor"]),
    Scope("environment key", ("environments", "reports", "delivery_timeout"),
          "WOVE__ENVIRONMENTS__REPORTS__DELIVERY_TIMEOUT",
          {"file": 10.0, "environment": "20", "argument": 30.0},
          {"file": 10.0, "environment": 20.0, "argument": 30.0, "default": None},
          lambda c: c.environment_settings("reports")["delivery_timeout"]
          if "reports" in c.environments else None),
    Scope("executor_config leaf", ("environments", "reports", "executor_config", "broker_url"),
          "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__BROKER_URL",
          {"file": "redis://file", "environment": "redis://env", "argument": "redis://arg"},
          {"file": "redis://file", "environment": "redis://env", "argument": "redis://arg",
           "default": None},
          lambda c: c.environment_settings("reports")["executor_config"].get("broker_url")
          if "reports" in c.environments else None),
    Scope("tasks table", ("tasks", "my_task", "retries"), "WOVE__TASKS__MY_TASK__RETRIES",
          {"file": 4, "environment": "5", "argument": 6},
          {"file": 4, "environment": 5, "argument": 6, "default": 0},
          lambda c: c.task_settings("my_task")["retries"]),
]
PAIRS = list(itertools.combinations(SOURCES, 2))  # (higher, lower), every pair once


def load_with(scope: Scope, sources: tuple[str, ...], tmp_path: Path) -> Config:
    environ: dict[str, str] = {}
    config: dict[str, Any] = {}
    if "file" in sources:
        write_py(tmp_path, nested(scope.path, scope.values["file"]))
    if "environment" in sources:
        environ[scope.env_var] = scope.values["environment"]
    if "argument" in sources:
        config = nested(scope.path, scope.values["argument"])
    return load_config(config, environ=environ, cwd=tmp_path)


@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: s.name)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}>{p[1]}")
def test_higher_source_wins_for_every_pair(
    scope: Scope, pair: tuple[str, str], tmp_path: Path
) -> None:
    higher, lower = pair
    cfg = load_with(scope, pair, tmp_path)
    assert scope.read(cfg) == scope.expected[higher]
    assert scope.expected[higher] != scope.expected[lower]
    assert cfg.source_of(*scope.path).kind == higher


@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: s.name)
def test_all_sources_together_argument_wins(scope: Scope, tmp_path: Path) -> None:
    cfg = load_with(scope, ("argument", "environment", "file"), tmp_path)
    assert scope.read(cfg) == scope.expected["argument"]
    assert cfg.source_of(*scope.path) == Provenance("argument", "Hub(...)/load_config argument")


def test_provenance_details_name_the_variable_and_the_file(tmp_path: Path) -> None:
    path = write_py(tmp_path, {"environments": {"reports": {"retries": 1, "timeout": 2.0}}})
    var = "WOVE__ENVIRONMENTS__REPORTS__RETRIES"
    cfg = load_config(environ={var: "7"}, cwd=tmp_path)
    assert cfg.source_of("environments", "reports", "retries") == Provenance("environment", var)
    assert cfg.source_of("environments", "reports", "timeout") == Provenance("file", str(path))
    assert cfg.source_of("max_workers") == Provenance("default", "built-in default")
    assert cfg.source_file == path


def test_keyword_overrides_beat_the_config_dict_and_none_keywords_are_ignored(
    tmp_path: Path,
) -> None:
    cfg = load_config({"delivery_timeout": 1.0, "retries": 2}, cwd=tmp_path, environ={},
                      delivery_timeout=5, retries=None, default_environment="reports",
                      environments={"reports": {"executor": "celery"}})
    assert cfg.defaults["delivery_timeout"] == 5.0
    assert cfg.defaults["retries"] == 2
    assert cfg.resolve_environment_name() == "reports"


# ------------------------------------------------------------------ deep merging

def test_tables_merge_key_by_key_across_sources(tmp_path: Path) -> None:
    write_py(tmp_path, {"environments": {"reports": {
        "executor": "celery", "retries": 1,
        "executor_config": {"broker_url": "redis://file", "queue": "low"}}},
        "tasks": {"t": {"retries": 2, "timeout": 3.0}}})
    environ = {"WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__QUEUE": "high",
               "WOVE__TASKS__T__RETRIES": "9"}
    cfg = load_config({"environments": {"reports": {"retries": 4}}}, environ=environ,
                      cwd=tmp_path)
    assert cfg.environments["reports"] == {
        "executor": "celery", "retries": 4,
        "executor_config": {"broker_url": "redis://file", "queue": "high"}}
    assert cfg.tasks["t"] == {"retries": 9, "timeout": 3.0}


def test_none_environment_in_higher_source_removes_it(tmp_path: Path) -> None:
    write_py(tmp_path, {"environments": {"reports": {"executor": "celery"}, "ml": {}}})
    cfg = load_config({"environments": {"reports": None}},
                      environ={"WOVE__ENVIRONMENTS__ML": "none"}, cwd=tmp_path)
    assert set(cfg.environments) == {"default"}


def test_none_value_in_higher_source_unsets_the_key(tmp_path: Path) -> None:
    write_py(tmp_path, {"timeout": 5.0, "max_workers": 8})
    cfg = load_config(environ={"WOVE__TIMEOUT": "none", "WOVE__MAX_WORKERS": ""}, cwd=tmp_path)
    assert cfg.defaults["timeout"] is None
    assert cfg.defaults["max_workers"] == BUILTIN_DEFAULTS["max_workers"]
    assert cfg.source_of("max_workers").kind == "default"


def test_default_environment_always_exists_unless_redefined(tmp_path: Path) -> None:
    assert load_config(environ={}, cwd=tmp_path).environments == {"default": {"executor": "local"}}
    cfg = load_config({"environments": {"default": {"executor": "celery"}}}, environ={},
                      cwd=tmp_path)
    assert cfg.environment_settings("default")["executor"] == "celery"


# ------------------------------------------------------------------ env var naming & parsing

def test_env_var_names_match_defined_names_case_insensitively(tmp_path: Path) -> None:
    write_py(tmp_path, {"environments": {"Reports": {"executor": "celery"}},
                        "tasks": {"MyTask": {"retries": 1}}})
    cfg = load_config(environ={"WOVE__ENVIRONMENTS__REPORTS__RETRIES": "3",
                               "WOVE__TASKS__MYTASK__RETRIES": "4",
                               "WOVE__ENVIRONMENTS__NEW_ENV__EXECUTOR": "ray"}, cwd=tmp_path)
    assert cfg.environments["Reports"]["retries"] == 3
    assert cfg.tasks["MyTask"]["retries"] == 4
    assert cfg.environments["new_env"] == {"executor": "ray"}


def test_env_values_are_parsed_to_the_key_type(tmp_path: Path) -> None:
    cfg = load_config(environ={
        "WOVE__BACKGROUND": "true", "WOVE__FORK": "0", "WOVE__DELIVERY_TIMEOUT": "2.5",
        "WOVE__MAX_PENDING": "10", "WOVE__DEFAULT_ENVIRONMENT": "reports",
        "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__PORT": "6379",
        "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__TLS": "true",
        "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__QUEUES": '["a", "b"]',
        "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__POOL__SIZE": "4",
        "WOVE__ENVIRONMENTS__REPORTS__EXECUTOR_CONFIG__URL": "redis://h:1/0",
    }, cwd=tmp_path)
    assert (cfg.defaults["background"], cfg.defaults["fork"]) == (True, False)
    assert cfg.defaults["delivery_timeout"] == 2.5
    assert cfg.defaults["max_pending"] == 10
    assert cfg.default_environment == "reports"
    assert cfg.environments["reports"]["executor_config"] == {
        "port": 6379, "tls": True, "queues": ["a", "b"], "pool": {"size": 4},
        "url": "redis://h:1/0"}


# ------------------------------------------------------------------ file discovery

def test_py_file_wins_over_toml_in_the_same_directory(tmp_path: Path) -> None:
    write_py(tmp_path, {"retries": 1})
    (tmp_path / "wove_config.toml").write_text("retries = 2\n")
    assert load_config(environ={}, cwd=tmp_path).defaults["retries"] == 1


def test_file_is_discovered_upwards_and_the_nearest_wins(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    write_py(tmp_path, {"retries": 1})
    assert load_config(environ={}, cwd=deep).defaults["retries"] == 1
    (tmp_path / "a" / "wove_config.toml").write_text("retries = 2\n")
    cfg = load_config(environ={}, cwd=deep)
    assert cfg.defaults["retries"] == 2
    assert cfg.source_file == tmp_path / "a" / "wove_config.toml"


def test_cwd_defaults_to_the_working_directory(tmp_path: Path) -> None:
    write_py(tmp_path, {"retries": 3})
    assert load_config(environ={}).defaults["retries"] == 3


def test_explicit_file_beats_wove_config_file_beats_discovery(tmp_path: Path) -> None:
    write_py(tmp_path, {"retries": 1})
    via_env = write_py(tmp_path, {"retries": 2}, name="from_env.py")
    explicit = write_py(tmp_path, {"retries": 3}, name="explicit.py")
    environ = {"WOVE_CONFIG_FILE": str(via_env)}
    assert load_config(environ=environ, cwd=tmp_path).defaults["retries"] == 2
    cfg = load_config(config_file=explicit, environ=environ, cwd=tmp_path)
    assert cfg.defaults["retries"] == 3


def test_relative_config_file_is_resolved_against_cwd(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = write_py(tmp_path / "conf", {"retries": 4}, name="mine.py")
    cfg = load_config(environ={"WOVE_CONFIG_FILE": "conf/mine.py"}, cwd=tmp_path)
    assert (cfg.defaults["retries"], cfg.source_file) == (4, path)


def test_bare_config_file_name_is_searched_upwards_like_wove(tmp_path: Path) -> None:
    deep = tmp_path / "a"
    deep.mkdir()
    path = write_py(tmp_path, {"retries": 5}, name="prod_config.py")
    cfg = load_config(config_file="prod_config.py", environ={}, cwd=deep)
    assert (cfg.defaults["retries"], cfg.source_file) == (5, path)


def test_toml_and_py_files_of_the_same_shape_load_identically(tmp_path: Path) -> None:
    shape = {"default_environment": "reports", "retries": 1,
             "environments": {"reports": {"executor": "celery", "delivery_timeout": 30.0,
                                          "executor_config": {"broker_url": "redis://x"}}},
             "tasks": {"my_task": {"retries": 3, "environment": "reports"}}}
    (tmp_path / "c.toml").write_text(
        'default_environment = "reports"\nretries = 1\n'
        '[environments.reports]\nexecutor = "celery"\ndelivery_timeout = 30.0\n'
        '[environments.reports.executor_config]\nbroker_url = "redis://x"\n'
        '[tasks.my_task]\nretries = 3\nenvironment = "reports"\n')
    py = write_py(tmp_path, shape, name="c.py")
    from_toml = load_config(config_file=tmp_path / "c.toml", environ={}, cwd=tmp_path)
    from_py = load_config(config_file=py, environ={}, cwd=tmp_path)
    assert from_toml.to_dict() == from_py.to_dict()
    assert from_toml.task_settings("my_task")["executor_config"] == {"broker_url": "redis://x"}


def test_py_file_with_module_level_keys(tmp_path: Path) -> None:
    (tmp_path / "wove_config.py").write_text(
        'default_environment = "reports"\n'
        'environments = {"reports": {"executor": "celery"}}\nretries = 2\n_private = 1\n')
    cfg = load_config(environ={}, cwd=tmp_path)
    assert (cfg.default_environment, cfg.defaults["retries"]) == ("reports", 2)


def test_wove_config_alias_for_executor_config_in_environments(tmp_path: Path) -> None:
    cfg = load_config({"environments": {"r": {"config": {"queue": "q"}}}}, environ={},
                      cwd=tmp_path)
    assert cfg.environments["r"] == {"executor_config": {"queue": "q"}}


def test_settings_are_copies_that_callers_may_mutate(tmp_path: Path) -> None:
    cfg = load_config({"environments": {"r": {"executor_config": {"pool": {"size": 1}}}}},
                      environ={}, cwd=tmp_path)
    cfg.environment_settings("r")["executor_config"]["pool"]["size"] = 99
    assert cfg.environments["r"]["executor_config"]["pool"]["size"] == 1


def test_executor_objects_are_kept_as_they_are(tmp_path: Path) -> None:
    executor = object()
    cfg = load_config({"environments": {"mine": {"executor": executor}}}, environ={},
                      cwd=tmp_path)
    assert cfg.environment_settings("mine")["executor"] is executor


# ------------------------------------------------------------------ environment-name resolution

@pytest.mark.parametrize(("task_env", "call_env", "default_env", "expected"), [
    ("t", "c", "d", "t"),
    (None, "c", "d", "c"),
    (None, None, "d", "d"),
    (None, None, None, "default"),
])
def test_environment_name_resolution_order(
    task_env: str | None, call_env: str | None, default_env: str | None, expected: str,
    tmp_path: Path,
) -> None:
    envs = {name: {"executor": name} for name in ("t", "c", "d")}
    cfg = load_config({"environments": envs}, environ={}, cwd=tmp_path,
                      default_environment=default_env)
    assert cfg.resolve_environment_name(task_env, call_env) == expected
    # Through task_settings the task level is the call site's task_options; a configured
    # tasks.<name> table sits below an explicit call-site environment (next test).
    cfg = load_config({"environments": envs}, environ={}, cwd=tmp_path,
                      default_environment=default_env)
    overrides = {"environment": task_env} if task_env else None
    settings = cfg.task_settings("job", environment=call_env, task_overrides=overrides)
    assert settings["environment"] == expected
    assert settings["executor"] == ("local" if expected == "default" else expected)


def test_call_site_environment_beats_the_tasks_table(tmp_path: Path) -> None:
    envs = {"a": {"executor": "a"}, "b": {"executor": "b"}}
    cfg = load_config({"environments": envs, "tasks": {"job": {"environment": "a"}}},
                      environ={}, cwd=tmp_path)
    assert cfg.task_settings("job")["environment"] == "a"
    assert cfg.task_settings("job", environment="b")["environment"] == "b"


def test_task_overrides_environment_beats_tasks_table(tmp_path: Path) -> None:
    envs = {"a": {"executor": "a"}, "b": {"executor": "b"}}
    cfg = load_config({"environments": envs, "tasks": {"job": {"environment": "a"}}},
                      environ={}, cwd=tmp_path)
    assert cfg.task_settings("job", task_overrides={"environment": "b"})["environment"] == "b"


# ------------------------------------------------------------------ task-settings level order

# What the call site says (task_options, then call settings) beats every configured level.
LEVELS = ("task_overrides", "call_overrides", "tasks_table", "environment", "global", "builtin")


@pytest.mark.parametrize("top", range(len(LEVELS)), ids=lambda i: LEVELS[i])
def test_task_settings_level_order(top: int, tmp_path: Path) -> None:
    """Only levels from ``top`` downwards set delivery_timeout; the highest of them wins."""
    present = LEVELS[top:]
    value = {name: float(i + 1) for i, name in enumerate(LEVELS)}
    config: dict[str, Any] = {"environments": {"reports": {}}, "tasks": {"job": {}}}
    if "global" in present:
        config["delivery_timeout"] = value["global"]
    if "environment" in present:
        config["environments"]["reports"]["delivery_timeout"] = value["environment"]
    if "tasks_table" in present:
        config["tasks"]["job"]["delivery_timeout"] = value["tasks_table"]
    cfg = load_config(config, environ={}, cwd=tmp_path)
    settings = cfg.task_settings(
        "job", environment="reports",
        call_overrides={"delivery_timeout": value["call_overrides"]}
        if "call_overrides" in present else None,
        task_overrides={"delivery_timeout": value["task_overrides"]}
        if "task_overrides" in present else None)
    expected = None if LEVELS[top] == "builtin" else value[LEVELS[top]]
    assert settings["delivery_timeout"] == expected


def test_none_in_a_higher_level_does_not_mask_a_lower_one(tmp_path: Path) -> None:
    cfg = load_config({"environments": {"reports": {"retries": 2}}}, environ={}, cwd=tmp_path)
    settings = cfg.task_settings(None, environment="reports",
                                 call_overrides={"retries": None},
                                 task_overrides={"retries": None, "environment": None})
    assert (settings["environment"], settings["retries"]) == ("reports", 2)


def test_environment_settings_stack_definition_over_globals_over_builtins(
    tmp_path: Path,
) -> None:
    cfg = load_config({"retries": 1, "timeout": 9.0,
                       "environments": {"reports": {"retries": 2}}}, environ={}, cwd=tmp_path)
    settings = cfg.environment_settings("reports")
    assert (settings["retries"], settings["timeout"], settings["max_workers"]) == (2, 9.0, 256)
    assert set(settings) == set(BUILTIN_DEFAULTS)


def test_executor_config_merges_across_levels_unless_the_executor_changes(
    tmp_path: Path,
) -> None:
    cfg = load_config({
        "executor": "celery", "executor_config": {"broker_url": "redis://x"},
        "environments": {"same": {"executor_config": {"queue": "q"}},
                         "other": {"executor": "ray", "executor_config": {"address": "auto"}}},
    }, environ={}, cwd=tmp_path)
    assert cfg.environment_settings("same")["executor_config"] == {
        "broker_url": "redis://x", "queue": "q"}
    assert cfg.environment_settings("other")["executor_config"] == {"address": "auto"}
    settings = cfg.task_settings("t", environment="same",
                                 task_overrides={"executor_config": {"queue": "high"}})
    assert settings["executor_config"] == {"broker_url": "redis://x", "queue": "high"}


def test_nested_executor_config_tables_merge_across_levels(tmp_path: Path) -> None:
    cfg = load_config({"executor_config": {"pool": {"size": 4, "timeout": 1}},
                       "environments": {"r": {"executor_config": {"pool": {"size": 8}}}}},
                      environ={}, cwd=tmp_path)
    assert cfg.environment_settings("r")["executor_config"] == {"pool": {"size": 8, "timeout": 1}}
