"""Task settings (issue 15): resolution and provenance, retry_for matching, our log formats."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core import frames, logs
from wove_adapters.core.codec import rebuild_exception
from wove_adapters.core.config import load_config
from wove_adapters.core.errors import CancelNotAcknowledgedError, TaskExecutionError
from wove_adapters.core.retry import check_retry_for, exception_matches, retry_allowed
from wove_adapters.core.task_settings import render_task, task_sources

# ---------------------------------------------------------------- resolution

_FILE = """
retries = 1
[task_defaults]
retry_for = ["ValueError"]
timeout = 9
retries = 4
[environments.batch]
executor = "stdio"
executor_config = {processes = 2}
retries = 2
[tasks.report]
environment = "batch"
retries = 3
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "wove_config.toml"
    path.write_text(_FILE)
    return path


def test_each_setting_names_the_level_and_source_it_came_from(config_file: Path) -> None:
    cfg = load_config(config_file=str(config_file),
                      environ={"WOVE__TASK__REPORT__CACHE_RESULTS": "true"})
    settings, sources = task_sources(cfg, "report")
    assert settings["retries"] == 3 and settings["timeout"] == 9.0
    assert settings["executor_config"] == {"processes": 2}
    assert settings["cache_results"] is True and settings["retry_for"] == ["ValueError"]

    def where(*path: str) -> tuple[str, str, str]:
        source, level = sources[path]
        return source.kind, source.detail, level

    assert where("retries") == ("file", str(config_file), "tasks.report")
    assert where("environment") == ("file", str(config_file), "tasks.report")
    assert where("executor") == ("file", str(config_file), "environments.batch")
    assert where("executor_config", "processes") == ("file", str(config_file),
                                                     "environments.batch")
    assert where("timeout") == ("file", str(config_file), "task_defaults")
    assert where("cache_results") == (
        "environment", "WOVE__TASK__REPORT__CACHE_RESULTS", "tasks.report")
    assert where("error_mode")[0] == "default"


def test_levels_fall_through_in_order(config_file: Path) -> None:
    """tasks.<name> > environment > task_defaults > top level, as Config.task_settings."""
    cfg = load_config(config_file=str(config_file), environ={})
    assert cfg.task_settings("other")["retries"] == 4  # task_defaults over the top level
    assert cfg.task_settings("other", environment="batch")["retries"] == 2
    _, sources = task_sources(cfg, "other", environment="batch")
    assert sources[("environment",)][0].kind == "argument"
    assert sources[("retries",)][1] == "environments.batch"


def test_the_seed_variable_form_and_the_plural_form_are_one_table() -> None:
    environ = {"WOVE__TASK__REPORT__RETRY_FOR": "ValueError, myapp.errors.Transient",
               "WOVE__TASKS__REPORT__RETRIES": "2"}
    cfg = load_config(environ=environ, tasks={"report": {"timeout": 5}})
    settings = cfg.task_settings("report")
    assert settings["retry_for"] == ["ValueError", "myapp.errors.Transient"]
    assert settings["retries"] == 2 and settings["timeout"] == 5.0


def test_render_task_in_both_formats(config_file: Path) -> None:
    cfg = load_config(config_file=str(config_file), environ={})
    text = render_task(cfg, "report")
    assert "[tasks.report]" in text and "[tasks.report.executor_config]" in text
    assert f"retries = 3  # from file {config_file} (tasks.report)" in text
    assert f'retry_for = ["ValueError"]  # from file {config_file} (task_defaults)' in text
    data = json.loads(render_task(cfg, "report", fmt="json"))
    assert data["values"]["tasks"]["report"]["retries"] == 3
    assert data["sources"]["tasks.report.retries"]["level"] == "tasks.report"
    assert data["sources"]["tasks.report.executor_config.processes"]["kind"] == "file"
    with pytest.raises(ValueError, match="Unknown format"):
        render_task(cfg, "report", fmt="yaml")


def test_secrets_are_redacted_in_a_task_view() -> None:
    cfg = load_config(environ={}, environments={"q": {
        "executor": "stdio", "executor_config": {"secret": "s3cr3t"}}},
        tasks={"t": {"environment": "q"}})
    assert "s3cr3t" not in render_task(cfg, "t")
    assert "s3cr3t" not in render_task(cfg, "t", fmt="json")


# ---------------------------------------------------------------- retry_for


class Transient(ConnectionError):
    pass


def test_bare_and_qualified_names_match_the_class_and_its_bases() -> None:
    exc = Transient("again")
    qualified = f"{__name__}.Transient"
    assert exception_matches(exc, ["Transient"])
    assert exception_matches(exc, [qualified])
    assert exception_matches(exc, ["OSError"])  # a base class, as an except clause
    assert exception_matches(exc, ["builtins.ConnectionError"])
    assert exception_matches(exc, ["Exception"])
    assert not exception_matches(exc, ["ValueError", "builtins.KeyError"])
    assert not exception_matches(exc, ["other.module.Transient"])
    assert not exception_matches(ValueError("x"), ["Transient"])
    assert exception_matches(KeyError("k"), ["LookupError"])
    assert not exception_matches(LookupError("k"), ["KeyError"])  # never a subclass


def test_an_exception_the_caller_cannot_rebuild_matches_by_its_remote_name() -> None:
    payload = {
        "kind": "Transient",
        "message": "again",
        "traceback": "Traceback (most recent call last):\n  File \"t.py\", line 1\n"
                     "myapp.errors.Transient: again\n",
    }
    exc = rebuild_exception(payload, None)  # nothing pickled: TaskExecutionError
    assert isinstance(exc, TaskExecutionError)
    assert exception_matches(exc, ["Transient"])
    assert exception_matches(exc, ["myapp.errors.Transient"])
    assert not exception_matches(exc, ["other.Transient"])
    assert not exception_matches(exc, ["RuntimeError"])  # the wrapper's bases are not its


def test_a_rebuilt_exception_keeps_its_type_for_matching() -> None:
    exc = rebuild_exception({"kind": "Transient", "message": "x"}, pickle.dumps(Transient("x")))
    assert exception_matches(exc, ["OSError"])


def test_retry_allowed_follows_retry_for_and_never_retries_cancellations() -> None:
    def error(exc: BaseException) -> dict[str, Any]:
        return {"type": frames.TASK_ERROR, "exception": exc,
                "error": {"kind": type(exc).__name__, "message": str(exc)}}

    assert retry_allowed(error(KeyError("k")), None)  # unset: every Exception
    assert retry_allowed(error(ValueError("v")), ["ValueError"])
    assert not retry_allowed(error(KeyError("k")), ["ValueError"])
    assert not retry_allowed(error(KeyboardInterrupt()), None)
    assert not retry_allowed(error(CancelNotAcknowledgedError("c")), ["Exception"])
    assert not retry_allowed({"type": frames.TASK_CANCELLED}, ["Exception"])
    assert not retry_allowed({"type": frames.TASK_RESULT, "result": 1}, None)
    no_object = {"type": frames.TASK_ERROR, "error": {"kind": "ValueError", "message": "v"}}
    assert retry_allowed(no_object, ["ValueError"])
    assert not retry_allowed(no_object, ["KeyError"])


def test_a_malformed_name_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="not an exception type name"):
        check_retry_for(["Value Error"])
    with pytest.raises(ValueError, match="not an exception type name"):
        check_retry_for([""])
    assert check_retry_for("ValueError") == frozenset({"ValueError"})
    assert check_retry_for(None) is None


# ---------------------------------------------------------------- log formats


@pytest.fixture
def restore_logging() -> Any:
    yield
    logs.reset_logging()


def _record(message: str, *args: Any, exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("wove_adapters.test", logging.ERROR, __file__, 1, message, args,
                             info)


def test_json_lines_carry_time_level_logger_message_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError as caught:
        line = logs.JsonFormatter().format(_record("run %s failed\nbadly", "r1", exc=caught))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "wove_adapters.test"
    assert entry["message"] == "run r1 failed\nbadly"
    assert entry["time"].endswith("+00:00")
    assert "ValueError: boom" in entry["exc_info"] and "Traceback" in entry["exc_info"]
    assert "exc_info" not in json.loads(logs.JsonFormatter().format(_record("fine")))


def test_configure_touches_only_our_logger(restore_logging: None) -> None:
    root_handlers = list(logging.getLogger().handlers)
    other = logging.getLogger("some.library")
    other_level = other.level
    stream = io.StringIO()
    logs.configure_logging("info", "json", stream=stream)
    logging.getLogger("wove_adapters.runtime").info("hello %d", 5)
    logging.getLogger("wove_adapters.runtime").debug("hidden")
    logging.getLogger("some.library").warning("not ours")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["hello 5"]
    assert logging.getLogger().handlers == root_handlers
    assert other.level == other_level
    logs.configure_logging("DEBUG", "text", stream=stream)  # replaces its own handler
    ours = logging.getLogger("wove_adapters")
    assert sum(getattr(h, "_wove_adapters_handler", False) for h in ours.handlers) == 1
    logs.reset_logging()
    assert not any(getattr(h, "_wove_adapters_handler", False) for h in ours.handlers)
    assert ours.propagate


def test_apply_settings_only_when_asked_and_once(restore_logging: None) -> None:
    logs.reset_logging()
    assert not logs.apply_settings({"log_level": None, "log_format": "text"})
    assert logs.apply_settings({"log_level": "WARNING", "log_format": "json"})
    assert not logs.apply_settings({"log_level": "DEBUG", "log_format": "text"})  # once
    ours = logging.getLogger("wove_adapters")
    assert ours.level == logging.WARNING
    handler = next(h for h in ours.handlers if getattr(h, "_wove_adapters_handler", False))
    assert isinstance(handler.formatter, logs.JsonFormatter)
