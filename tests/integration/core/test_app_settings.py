"""Issue 15's application settings and retry rules, end to end in real processes:
force_local over ten backend environments (none of their libraries installed), retry_for
through stdio worker processes (Hub and wove weave), ``config --task`` through the real
command, and log_level / log_format from variables in a fresh interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.integration.environments import FORCE_LOCAL_NOTICE
from wove_adapters.integration.executor_config import check_settings

# executor -> (an executor_config a real deployment would give it, its library's modules)
BACKENDS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "celery": ({"broker_url": "amqp://guest:guest@127.0.0.1:5672//"}, ("celery", "kombu")),
    "rq": ({"redis_url": "redis://127.0.0.1:6379/0", "queue": "reports"}, ("rq",)),
    "arq": ({"redis_url": "redis://127.0.0.1:6379/0"}, ("arq",)),
    "taskiq": ({"url": "redis://127.0.0.1:6379/0", "broker": "stream"},
               ("taskiq", "taskiq_redis")),
    "dask": ({"address": "tcp://127.0.0.1:8786"}, ("dask", "distributed")),
    "ray": ({"address": "ray://127.0.0.1:10001"}, ("ray",)),
    "temporal": ({"address": "127.0.0.1:7233", "task_queue": "reports"}, ("temporalio",)),
    "kubernetes_jobs": ({"namespace": "jobs", "image": "python:3.11"}, ("kubernetes",)),
    "aws_batch": ({"job_queue": "q", "job_definition": "d", "region": "eu-west-1"},
                  ("boto3", "botocore")),
    "slurm": ({"spool_dir": "/shared/spool"}, ()),  # sbatch on PATH: no library
}
LIBRARIES = sorted(module for _, modules in BACKENDS.values() for module in modules)
# Our adapter modules for them: not imported either (the switch comes before any transport).
ADAPTERS = sorted(f"wove_adapters.adapters.{name}" for name in BACKENDS)


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """No stray WOVE__ variable or config file; returns the environment for children."""
    for name in list(os.environ):
        if name.upper().startswith("WOVE__") or name == "WOVE_CONFIG_FILE":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return dict(os.environ)


# ---------------------------------------------------------------- force_local

_CALLER = textwrap.dedent("""
    import json, os, sys
    from wove_adapters import Hub

    def where(name):
        return name, os.getpid()

    names = sys.argv[1].split(",")
    with Hub() as hub:
        results = [hub.run(where, name, environment=name) for name in names]
        second = Hub()  # a second front end in the same process: no second notice
        second.run(where, "again", environment=names[0])
        second.close()
    print(json.dumps({"pid": os.getpid(), "results": results, "loaded": sorted(sys.modules)}))
""")


@pytest.mark.parametrize("switch", ["variable", "file"])
def test_force_local_runs_ten_backend_environments_without_their_libraries(
    switch: str, tmp_path: Path, clean_env: dict[str, str]
) -> None:
    for module in LIBRARIES:  # the `core` env has none of them: the point of the test
        assert importlib.util.find_spec(module) is None, f"{module} is installed here"
    for name, (options, _) in BACKENDS.items():  # each a valid config for its backend
        check_settings(name, {"executor": name, "executor_config": options})
    lines = ['default_environment = "celery"']
    if switch == "file":
        lines.insert(0, "force_local = true")
    for name, (options, _) in BACKENDS.items():
        lines.append(f"[environments.{name}]\nexecutor = \"{name}\"")
        lines.append(f"[environments.{name}.executor_config]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in options.items()]
    (tmp_path / "wove_config.toml").write_text("\n".join(lines) + "\n")
    (tmp_path / "caller.py").write_text(_CALLER)
    env = {**clean_env, **({"WOVE__FORCE_LOCAL": "1"} if switch == "variable" else {})}
    done = subprocess.run(
        [sys.executable, "caller.py", ",".join(BACKENDS)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["results"] == [[name, report["pid"]] for name in BACKENDS]
    top_level = {module.split(".")[0] for module in report["loaded"]}
    assert not top_level & set(LIBRARIES)
    assert not set(report["loaded"]) & set(ADAPTERS)
    assert done.stderr.count(FORCE_LOCAL_NOTICE) == 1, done.stderr
    assert "WOVE__FORCE_LOCAL" in FORCE_LOCAL_NOTICE and "force_local" in FORCE_LOCAL_NOTICE


def test_without_force_local_the_same_config_names_the_missing_extra(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """The control: the switch, not the config, is what keeps the backends away."""
    with Hub(environments={"celery": {"executor": "celery"}}) as hub, pytest.raises(
        Exception, match=r"wove-adapters\[celery\]"
    ):
        hub.run(os.getpid, environment="celery")


# ---------------------------------------------------------------- retry_for


def flaky(directory: str, failures: int, kind: str) -> int:
    """Fails ``failures`` times with ``kind``, then returns the number of attempts."""
    path = Path(directory, "attempts")
    with path.open("a") as handle:
        handle.write(f"{os.getpid()}\n")
    count = len(path.read_text().splitlines())
    if count <= failures:
        raise {"ValueError": ValueError, "KeyError": KeyError}[kind](f"attempt {count}")
    return count


def attempts(directory: Path) -> int:
    path = directory / "attempts"
    return len(path.read_text().splitlines()) if path.exists() else 0


def stdio_hub(**task_settings: Any) -> Hub:
    return Hub(environments={"w": {"executor": "stdio", "executor_config": {"processes": 1}}},
               default_environment="w", tasks={"flaky": task_settings})


def test_retry_for_retries_the_named_type_until_it_succeeds(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with stdio_hub(retries=2, retry_for=["ValueError"]) as hub:
        assert hub.run(flaky, str(tmp_path), 2, "ValueError") == 3
    assert attempts(tmp_path) == 3


def test_retry_for_fails_other_types_at_once(tmp_path: Path, clean_env: dict[str, str]) -> None:
    with stdio_hub(retries=2, retry_for=["ValueError"]) as hub, pytest.raises(
        KeyError, match="attempt 1"
    ):
        hub.run(flaky, str(tmp_path), 2, "KeyError")
    assert attempts(tmp_path) == 1


def test_retry_for_matches_base_classes_and_qualified_names_from_task_defaults(
    tmp_path: Path, clean_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LookupError`` names KeyError's base; task_defaults and the variable form apply."""
    monkeypatch.setenv("WOVE__TASK__FLAKY__RETRY_FOR", "builtins.LookupError")
    with Hub(environments={"w": {"executor": "stdio"}}, default_environment="w",
             task_defaults={"retries": 1}) as hub:
        assert hub.run(flaky, str(tmp_path), 1, "KeyError") == 2
    assert attempts(tmp_path) == 2


def test_retries_beyond_the_budget_raise_the_last_error(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    with stdio_hub(retries=1, retry_for=["ValueError"]) as hub, pytest.raises(
        ValueError, match="attempt 2"
    ):
        hub.run(flaky, str(tmp_path), 5, "ValueError")
    assert attempts(tmp_path) == 2


@pytest.fixture
def wove() -> Any:
    module = pytest.importorskip("wove", reason="the wove extra is part of `dev`; install it")
    yield module
    module.config(environments={"default": {"executor": "local"}}, default_environment="default")


def test_a_keyed_run_is_retried_in_place_as_one_run(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    """With a key, the retries are attempts of one run: one ledger record, attempt 3,
    its final outcome what ``hub.result`` and the CLI read."""
    from wove_adapters.core import loop as shared_loop
    from wove_adapters.core.ledger import open_ledger

    url = f"sqlite:///{tmp_path}/runs.db"
    with Hub(environments={"w": {"executor": "stdio"}}, default_environment="w", ledger=url,
             tasks={"flaky": {"retries": 2, "retry_for": ["ValueError"],
                              "delivery_idempotency_key": "flaky-{failures}"}}) as hub:
        future = hub.submit(flaky, str(tmp_path), 2, "ValueError")
        assert future.result(timeout=60) == 3
        assert hub.result(future.run_id, timeout=30) == 3
        (tmp_path / "over").mkdir()
        over = hub.submit(flaky, str(tmp_path / "over"), 5, "ValueError")
        with pytest.raises(ValueError, match="attempt 3"):  # the budget: 1 + 2 attempts
            over.result(timeout=60)
    records = shared_loop.run_sync(open_ledger(url).list_runs(limit=10))
    by_key = {record.idempotency_key: record for record in records}
    assert len(records) == 2, [(r.run_id, r.attempt, r.state) for r in records]
    assert by_key["flaky-2"].run_id == future.run_id
    assert (by_key["flaky-2"].attempt, by_key["flaky-2"].state) == (3, "succeeded")
    assert (by_key["flaky-5"].attempt, by_key["flaky-5"].state) == (3, "failed")
    assert attempts(tmp_path) == 3 and attempts(tmp_path / "over") == 3


@pytest.mark.parametrize(("kind", "expected", "keyed"), [
    ("ValueError", 3, False), ("KeyError", 1, False), ("ValueError", 3, True),
])
def test_the_wove_bridge_applies_our_task_retries_with_retry_for(
    kind: str, expected: int, keyed: bool, tmp_path: Path, clean_env: dict[str, str],
    wove: Any,
) -> None:
    from wove_adapters.core import loop as shared_loop
    from wove_adapters.core.ledger import open_ledger
    from wove_adapters.integration.wove import executor

    table: dict[str, Any] = {"retries": 2, "retry_for": ["ValueError"]}
    if keyed:  # then the dispatcher retries in place: one run, attempt 3
        table["delivery_idempotency_key"] = f"step-{tmp_path.name}"
    url = f"sqlite:///{tmp_path}/runs.db"
    ours = {"tasks": {"flaky_step": table}, "ledger": url}
    wove.config(environments={"remote": {"executor": executor("stdio", config=ours)}})
    directory = str(tmp_path)
    with wove.weave(error_mode="return") as w:

        @w.do(environment="remote")
        def flaky_step() -> int:
            return flaky(directory, 2, kind)

    outcome = w.result.flaky_step
    if kind == "ValueError":
        assert outcome == 3
    else:
        assert isinstance(outcome, KeyError)
    assert attempts(tmp_path) == expected
    if keyed:
        ledger = open_ledger(url)
        records = shared_loop.run_sync(ledger.list_runs(limit=10))
        assert len(records) == 1, records
        # The last attempts' writes may still sit in the dispatcher's 10 ms commit window
        # (a run's record was read at attempt 1 under load): wait for the outcome first.
        ended = shared_loop.run_sync(ledger.wait_outcome(records[0].run_id, timeout=10))
        assert ended is not None and ended.state == "succeeded"
        assert ended.attempt == 3, ended


# ---------------------------------------------------------------- config --task


def test_config_task_through_the_real_command(tmp_path: Path, clean_env: dict[str, str]) -> None:
    (tmp_path / "wove_config.toml").write_text(
        '[task_defaults]\ntimeout = 9\n[environments.batch]\nexecutor = "stdio"\nretries = 2\n'
        '[tasks.report]\nenvironment = "batch"\nretries = 3\n')
    command = Path(sys.executable).with_name("wove-adapters")
    env = {**clean_env, "WOVE__TASK__REPORT__RETRY_FOR": "ValueError,myapp.errors.Transient"}
    done = subprocess.run([str(command), "config", "--task", "report"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    source = tmp_path / "wove_config.toml"
    assert f"retries = 3  # from file {source} (tasks.report)" in done.stdout
    assert f"timeout = 9.0  # from file {source} (task_defaults)" in done.stdout
    assert f'executor = "stdio"  # from file {source} (environments.batch)' in done.stdout
    assert ('retry_for = ["ValueError", "myapp.errors.Transient"]  # from '
            "WOVE__TASK__REPORT__RETRY_FOR (tasks.report)") in done.stdout
    as_json = subprocess.run(
        [str(command), "config", "--task", "report", "--format", "json"], cwd=tmp_path,
        env=env, capture_output=True, text=True, timeout=60)
    data = json.loads(as_json.stdout)
    assert data["values"]["tasks"]["report"]["environment"] == "batch"
    assert data["sources"]["tasks.report.retry_for"]["kind"] == "environment"


# ---------------------------------------------------------------- log_level / log_format


def test_log_settings_from_variables_format_only_our_loggers(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    script = textwrap.dedent("""
        import logging
        from wove_adapters import Hub
        hub = Hub()
        logging.getLogger("wove_adapters.probe").info("ours %s", "info")
        logging.getLogger("wove_adapters.probe").debug("below the level")
        logging.getLogger("other.library").warning("theirs")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("wove_adapters.probe").exception("failed")
        print("root handlers", len(logging.getLogger().handlers))
        hub.close()
    """)
    env = {**clean_env, "WOVE__LOG_LEVEL": "info", "WOVE__LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "root handlers 0" in done.stdout
    lines = done.stderr.splitlines()
    ours = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(e["logger"], e["level"], e["message"]) for e in ours] == [
        ("wove_adapters.probe", "INFO", "ours info"),
        ("wove_adapters.probe", "ERROR", "failed")]
    assert "ValueError: boom" in ours[1]["exc_info"]
    assert {"time", "level", "logger", "message"} <= set(ours[0])
    assert "theirs" in lines  # another library's line: Python's own last-resort text
