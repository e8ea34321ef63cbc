"""Every configuration error names what is wrong, where it came from, and what would be right."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core.config import load_config

pytestmark = pytest.mark.usefixtures("isolated_config")


def load(config: dict[str, Any], **kwargs: Any) -> Any:
    return load_config(config, environ=kwargs.pop("environ", {}), **kwargs)


CANCEL = ("best_effort", "require_ack")
ORPHAN = ("cancel", "detach", "fail", "requeue")


@pytest.mark.parametrize(("key", "allowed"), [
    ("delivery_cancel_mode", CANCEL), ("delivery_orphan_policy", ORPHAN),
    ("error_mode", ("raise", "return")),
])
@pytest.mark.parametrize(("config_for", "where"), [
    (lambda k: {"environments": {"reports": {k: "bogus"}}}, "environment 'reports'"),
    (lambda k: {k: "bogus"}, "global defaults"),
    (lambda k: {"tasks": {"my_task": {k: "bogus"}}}, "task 'my_task'"),
], ids=["environment", "globals", "task"])
def test_invalid_choice_names_the_place_and_lists_allowed_values(
    key: str, allowed: tuple[str, ...], config_for: Any, where: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(where)) as info:
        load(config_for(key))
    message = str(info.value)
    assert key in message and "bogus" in message
    assert all(f"'{value}'" in message for value in allowed)


def test_invalid_choice_from_a_variable_names_the_variable() -> None:
    var = "WOVE__ENVIRONMENTS__REPORTS__DELIVERY_ORPHAN_POLICY"
    with pytest.raises(ValueError, match=var):
        load({}, environ={var: "explode"})


def test_invalid_choice_in_call_overrides_is_rejected() -> None:
    cfg = load({})
    with pytest.raises(ValueError, match="require_ack"):
        cfg.task_settings("t", call_overrides={"delivery_cancel_mode": "never"})


@pytest.mark.parametrize(("config", "bad", "suggestion", "where"), [
    ({"delivery_timout": 3}, "delivery_timout", "delivery_timeout", "global defaults"),
    ({"default_enviroment": "x"}, "default_enviroment", "default_environment",
     "global defaults"),
    ({"environments": {"reports": {"excutor": "celery"}}}, "excutor", "executor",
     "environment 'reports'"),
    ({"tasks": {"t": {"retires": 2}}}, "retires", "retries", "task 't'"),
])
def test_unknown_key_is_named_with_the_closest_known_key(
    config: dict[str, Any], bad: str, suggestion: str, where: str
) -> None:
    with pytest.raises(ValueError, match=f"'{bad}'.*{re.escape(where)}") as info:
        load(config)
    assert f"Did you mean '{suggestion}'?" in str(info.value)


def test_unknown_key_from_a_variable_names_the_variable() -> None:
    with pytest.raises(ValueError, match=r"WOVE__MAX_WORKER.*max_workers"):
        load({}, environ={"WOVE__MAX_WORKER": "3"})


def test_wrong_type_in_a_file_names_key_source_and_expected_type(tmp_path: Path) -> None:
    path = tmp_path / "wove_config.py"
    path.write_text('WOVE_CONFIG = {"environments": {"reports": {"retries": "x"}}}\n')
    with pytest.raises(ValueError, match="retries") as info:
        load_config(environ={}, cwd=tmp_path)
    assert str(path) in str(info.value) and "int" in str(info.value)


def test_wrong_type_in_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "wove_config.toml"
    path.write_text('background = "sometimes"\n')
    with pytest.raises(ValueError, match=f"background.*bool.*{re.escape(str(path))}"):
        load_config(environ={}, cwd=tmp_path)


def test_bool_is_not_accepted_as_an_int() -> None:
    with pytest.raises(ValueError, match=r"max_workers.*int"):
        load({"max_workers": True})


def test_unparseable_variable_names_the_variable_and_type() -> None:
    with pytest.raises(ValueError, match=r"WOVE__TASKS__T__RETRIES.*int"):
        load({}, environ={"WOVE__TASKS__T__RETRIES": "three"})
    with pytest.raises(ValueError, match=r"WOVE__DELIVERY_TIMEOUT.*float"):
        load({}, environ={"WOVE__DELIVERY_TIMEOUT": "soon"})


def test_executor_config_must_be_a_dict() -> None:
    with pytest.raises(ValueError, match=r"executor_config.*dict"):
        load({"environments": {"reports": {"executor_config": "redis://x"}}})


@pytest.mark.parametrize("config", [
    {"environments": ["reports"]},
    {"environments": {"reports": "celery"}},
    {"tasks": "t"},
])
def test_tables_that_are_not_dicts_raise_type_error(config: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="dict"):
        load(config)


def test_wove_config_that_is_not_a_dict_raises_type_error(tmp_path: Path) -> None:
    (tmp_path / "wove_config.py").write_text("WOVE_CONFIG = [1, 2]\n")
    with pytest.raises(TypeError, match="WOVE_CONFIG"):
        load_config(environ={}, cwd=tmp_path)


def test_unknown_environment_is_a_name_error_at_use_not_at_load() -> None:
    cfg = load({"environments": {"reports": {}, "ml": {}}}, default_environment="nope")
    expected = "Environment 'nope' is not configured. Known: default, ml, reports"
    with pytest.raises(NameError, match=re.escape(expected)):
        cfg.environment_settings("nope")
    with pytest.raises(NameError, match=re.escape(expected)):
        cfg.task_settings("t")
    with pytest.raises(NameError, match=r"'typo'.*Known: default, ml, reports"):
        cfg.task_settings("t", environment="typo")


def test_missing_explicit_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "wove_config.toml"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_config(config_file=missing, environ={})
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_config(environ={"WOVE_CONFIG_FILE": str(missing)})


def test_file_with_an_unsupported_suffix_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "wove.yaml"
    path.write_text("retries: 1\n")
    with pytest.raises(ValueError, match=r"\.py or \.toml"):
        load_config(config_file=path, environ={})
