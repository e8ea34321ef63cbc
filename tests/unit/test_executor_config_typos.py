"""A misspelt ``executor_config`` key fails when the environment starts, for every executor.

Before, adapters read their options with ``config.get`` and a typo was silently ignored
(``redis_ulr`` sent the job to the default Redis of somebody else and the caller hung).
These tests need no backend: the check runs before the backend library is imported, so
they also pass where the library is not installed, and nothing is ever submitted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from wove_adapters.adapters import adapter_names, get_adapter_class
from wove_adapters.cli import main
from wove_adapters.core.errors import ExecutorConfigError
from wove_adapters.core.options import option_keys
from wove_adapters.integration.executor_config import config_struct_for
from wove_adapters.integration.hub import Hub

# executor -> (a real key of that executor, a typo of it a new user could make)
TYPOS: dict[str, tuple[str, str]] = {
    "arq": ("redis_url", "redis_ulr"),
    "aws_batch": ("job_queue", "job_queeu"),
    "celery": ("broker_url", "broker_ulr"),
    "dask": ("address", "adress"),
    "kubernetes_jobs": ("namespace", "namepsace"),
    "local": ("max_workers", "max_worker"),
    "process": ("spool_dir", "spool_dri"),
    "ray": ("force_cancel_after", "force_cancel_afetr"),
    "rq": ("redis_url", "redis_ulr"),
    "slurm": ("partition", "partiton"),
    "stdio": ("processes", "proceses"),
    "taskiq": ("control_url", "control_ulr"),
    "temporal": ("task_queue", "task_qeue"),
}


def _double(x: int) -> int:
    return 2 * x


def test_every_executor_is_covered() -> None:
    assert set(TYPOS) == {"local", "stdio", *adapter_names()}


def _backend_modules(executor: str) -> tuple[str, ...]:
    if executor in ("local", "stdio"):
        return ()
    return get_adapter_class(executor, require_backend=False).required_modules


@pytest.mark.parametrize("executor", sorted(TYPOS))
def test_typo_raises_at_start_naming_key_executor_and_fix(executor: str) -> None:
    real, typo = TYPOS[executor]
    struct = config_struct_for(executor)
    assert struct is not None and real in option_keys(struct)
    not_loaded = [m for m in _backend_modules(executor) if m not in sys.modules]
    hub = Hub(environments={"images": {
        "executor": executor, "executor_config": {typo: "x"}}})
    with hub, pytest.raises(ExecutorConfigError) as caught:
        hub.run(_double, 21, environment="images")
    message = str(caught.value)
    assert message.startswith(
        f"environment 'images' ({executor}): unknown executor_config key '{typo}'; "
        f"did you mean '{real}'? Valid keys: "
    ), message
    assert f", {real}," in message or f" {real}," in message or message.endswith(real)
    err = caught.value
    assert (err.key, err.executor, err.environment, err.suggestion) == (
        typo, executor, "images", real)
    assert isinstance(err, ValueError)
    # Refused before the backend library was imported (and so before any connection).
    assert [m for m in not_loaded if m in sys.modules] == []


@pytest.mark.parametrize("executor", sorted(TYPOS))
def test_every_real_key_is_accepted(executor: str) -> None:
    """The check itself refuses nothing the executor declares (None: unset)."""
    from wove_adapters.core.options import check_executor_config

    struct = config_struct_for(executor)
    assert struct is not None
    check_executor_config(struct, dict.fromkeys(option_keys(struct)),
                          environment="images", executor=executor)


@pytest.mark.parametrize(("executor", "key", "value", "expected"), [
    ("rq", "redis_options", "socket_timeout=1", "must be a table (dict), not 'socket_timeout=1'"),
    ("process", "reconcile_grace", "soon", "must be a number, not 'soon'"),
    ("stdio", "processes", 2.5, "must be an integer, not 2.5"),
    ("celery", "idempotency_claim", "maybe", "must be true or false, not 'maybe'"),
])
def test_wrong_type_names_key_and_expected_type(
    executor: str, key: str, value: object, expected: str
) -> None:
    hub = Hub(environments={"images": {"executor": executor, "executor_config": {key: value}}})
    with hub, pytest.raises(ExecutorConfigError) as caught:
        hub.run(_double, 21, environment="images")
    assert str(caught.value) == (
        f"environment 'images' ({executor}): executor_config key '{key}' {expected} "
        f"({type(value).__name__})")


def test_lenient_where_the_executor_is() -> None:
    """Values adapters convert themselves stay accepted: numbers parsed from WOVE__...
    JSON for string keys, numeric strings for numbers, path objects, None (unset)."""
    from wove_adapters.core.options import check_executor_config

    struct = config_struct_for("rq")
    check_executor_config(struct, {
        "queue": 7, "reconcile_seconds": "0.5", "redis_url": None, "job_timeout": "1h",
        "_key_id": "internal", "_ledger_url": None,
    }, environment="e", executor="rq")
    check_executor_config(config_struct_for("process"), {"spool_dir": Path("/tmp")},
                          environment="e", executor="process")


def test_config_command_reports_the_typo(tmp_path: Path) -> None:
    path = tmp_path / "wove_config.toml"
    path.write_text('[environments.images]\nexecutor = "rq"\n'
                    '[environments.images.executor_config]\nredis_ulr = "redis://x"\n')
    result = CliRunner().invoke(main, ["config", "--config", str(path)])
    assert result.exit_code == 1
    assert ("environment 'images' (rq): unknown executor_config key 'redis_ulr'; "
            "did you mean 'redis_url'?") in result.output


def test_doctor_reports_the_typo_without_starting(tmp_path: Path) -> None:
    path = tmp_path / "wove_config.toml"
    path.write_text('[environments.images]\nexecutor = "celery"\n'
                    '[environments.images.executor_config]\nbroker_ulr = "redis://x"\n')
    result = CliRunner().invoke(main, ["doctor", "--config", str(path),
                                       "--environment", "images", "--timeout", "5"])
    assert result.exit_code == 1, result.output
    assert "environment 'images' (celery)" in result.output  # the executor it names
    assert "unknown executor_config key 'broker_ulr'; did you mean 'broker_url'?" in result.output


def test_config_check_imports_no_backend_library(tmp_path: Path) -> None:
    """``wove-adapters config`` checks every adapter's keys without importing any backend
    library (the structs sit in modules that import their library lazily)."""
    import json
    import subprocess

    backends = sorted({m.split(".")[0] for name in adapter_names()
                       for m in _backend_modules(name)} | {"boto3", "kombu", "distributed"})
    environments = {name: {"executor": name, "executor_config": {"reconcile_seconds": 1}}
                    for name in sorted(TYPOS)}
    path = tmp_path / "wove_config.py"
    path.write_text(f"WOVE_CONFIG = {{'environments': {environments!r}}}\n")
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from wove_adapters.cli import main\n"
        f"result = CliRunner().invoke(main, ['config', '--config', {str(path)!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        f"print(json.dumps(sorted(m for m in {backends!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
