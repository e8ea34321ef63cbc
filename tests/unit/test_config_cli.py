"""``wove-adapters config`` prints the merged configuration and the source of every value."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wove_adapters.cli import main
from wove_adapters.core.config import load_config, render_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

VAR = "WOVE__ENVIRONMENTS__REPORTS__DELIVERY_TIMEOUT"


@pytest.fixture(autouse=True)
def _isolated(isolated_config: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VAR, "30")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings.toml"
    path.write_text(
        'default_environment = "reports"\nretries = 2\n'
        '[environments.reports]\nexecutor = "celery"\ndelivery_timeout = 10\n'
        '[environments.reports.executor_config]\n'
        'broker_url = "redis://user:hunter2@localhost/0"\nsecret = "s3cret"\n'
        '[tasks.my_task]\nretries = 5\n')
    return path


def run(*args: str) -> str:
    result = CliRunner().invoke(main, ["config", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_json_output_has_values_and_sources(config_file: Path) -> None:
    data = json.loads(run("--config", str(config_file), "--format", "json"))
    reports = data["values"]["environments"]["reports"]
    assert reports["delivery_timeout"] == 30.0
    assert reports["executor"] == "celery"
    assert data["values"]["tasks"]["my_task"]["retries"] == 5
    sources = data["sources"]
    assert sources["environments.reports.delivery_timeout"] == {
        "kind": "environment", "detail": VAR}
    assert sources["environments.reports.executor"] == {
        "kind": "file", "detail": str(config_file)}
    assert sources["max_workers"] == {"kind": "default", "detail": "built-in default"}


def test_toml_output_is_valid_toml_with_a_source_comment_per_value(config_file: Path) -> None:
    output = run("--config", str(config_file), "--format", "toml")
    parsed = tomllib.loads(output)
    assert parsed["environments"]["reports"]["delivery_timeout"] == 30.0
    assert parsed["default_environment"] == "reports"
    assert f"delivery_timeout = 30.0  # from {VAR}" in output
    assert f'executor = "celery"  # from file {config_file}' in output
    assert "max_workers = 256  # from default" in output


def test_toml_is_the_default_format(config_file: Path) -> None:
    assert run("--config", str(config_file)) == run("--config", str(config_file),
                                                     "--format", "toml")


def test_secrets_are_masked_in_both_formats(config_file: Path) -> None:
    for fmt in ("json", "toml"):
        output = run("--config", str(config_file), "--format", fmt)
        assert "s3cret" not in output and "hunter2" not in output
        assert "redis://user:***@localhost/0" in output


def test_environment_option_shows_that_environments_resolved_settings(
    config_file: Path,
) -> None:
    data = json.loads(run("--config", str(config_file), "--format", "json",
                          "--environment", "reports"))
    assert list(data["values"]["environments"]) == ["reports"]
    reports = data["values"]["environments"]["reports"]
    assert (reports["retries"], reports["delivery_timeout"]) == (2, 30.0)
    assert data["sources"]["environments.reports.retries"]["detail"] == str(config_file)
    assert data["sources"]["environments.reports.delivery_timeout"]["detail"] == VAR
    assert data["sources"]["environments.reports.max_workers"]["kind"] == "default"
    toml_output = run("--config", str(config_file), "--environment", "reports")
    assert "[environments.reports]" in toml_output
    assert "[environments.default]" not in toml_output
    assert "[tasks" not in toml_output


def test_discovered_file_is_used_without_config_option(tmp_path: Path, config_file: Path) -> None:
    config_file.rename(tmp_path / "wove_config.toml")
    data = json.loads(run("--format", "json"))
    assert data["sources"]["retries"]["detail"] == str(tmp_path / "wove_config.toml")


def test_unknown_environment_fails(config_file: Path) -> None:
    result = CliRunner().invoke(main, ["config", "--config", str(config_file),
                                       "--environment", "nope"])
    assert result.exit_code == 1
    assert "NameError" in result.output and "Known: default, reports" in result.output


class CeleryLikeExecutor:
    def __repr__(self) -> str:
        return "CeleryLikeExecutor(app='x')"


def test_objects_render_as_their_repr_in_both_formats(tmp_path: Path) -> None:
    cfg = load_config({"environments": {"mine": {
        "executor": CeleryLikeExecutor(), "delivery_idempotency_key": len,
        "executor_config": {"password": "pw", "nested": {"client_secret": "cs"}}}}},
        environ={}, cwd=tmp_path)
    parsed = tomllib.loads(render_config(cfg))
    mine = parsed["environments"]["mine"]
    assert mine["executor"] == "CeleryLikeExecutor(app='x')"
    assert mine["delivery_idempotency_key"] == repr(len)
    assert mine["executor_config"] == {"password": "***", "nested": {"client_secret": "***"}}
    data = json.loads(render_config(cfg, fmt="json", environment="mine"))
    assert data["values"]["environments"]["mine"]["executor"] == "CeleryLikeExecutor(app='x')"
    assert data["sources"]["environments.mine.executor"]["kind"] == "argument"


def test_unknown_format_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="yaml"):
        render_config(load_config(environ={}, cwd=tmp_path), fmt="yaml")
