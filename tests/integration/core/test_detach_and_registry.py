"""Detach across processes, entry-point adapters, and the start-up errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, ClassVar

import pytest

from wove_adapters import Hub, MissingBackendError, MissingDispatchFeatureError
from wove_adapters.adapters import registry
from wove_adapters.adapters.process import ProcessAdapter
from wove_adapters.core.errors import UnsupportedPolicyError
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

CALLER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from wove_adapters import Hub, DeliveryDetachedError

    def slow(marker):
        Path(marker + ".started").write_text("1")
        time.sleep(2.0)
        Path(marker + ".done").write_text("1")
        return {"answer": 42}

    hub = Hub(environments={"p": {"executor": "process", "delivery_orphan_policy": "detach"}},
              default_environment="p", ledger=sys.argv[2])
    future = hub.submit(slow, sys.argv[1])
    while not Path(sys.argv[1] + ".started").exists():
        time.sleep(0.02)
    hub.close()
    try:
        future.result(timeout=10)
    except DeliveryDetachedError as exc:
        print(exc.run_id, flush=True)
    """
)


def test_detached_run_outlives_its_caller(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path / 'runs.db'}"
    marker = str(tmp_path / "m")
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    # Files, not pipes: the detached worker outlives the caller and keeps its stdio.
    with open(tmp_path / "out", "w") as stdout, open(tmp_path / "err", "w") as stderr:
        code = subprocess.run(
            [sys.executable, str(script), marker, ledger], stdout=stdout, stderr=stderr, timeout=60
        ).returncode
    assert code == 0, (tmp_path / "err").read_text()
    run_id = (tmp_path / "out").read_text().strip().splitlines()[-1]
    assert not Path(marker + ".done").exists(), "the caller waited for the task"
    wait_for_file(Path(marker + ".done"), 30)
    cli = [sys.executable, "-m", "wove_adapters.cli"]
    result = subprocess.run(
        [*cli, "result", run_id, "--ledger", ledger, "--wait", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"answer": 42}
    listing = subprocess.run(
        [*cli, "runs", "--ledger", ledger, "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    runs = {r["run_id"]: r for r in json.loads(listing.stdout)}
    assert runs[run_id]["state"] == "succeeded" and runs[run_id]["has_outcome"]


def test_idempotency_across_processes_sharing_a_ledger(tmp_path: Path) -> None:
    ledger = f"sqlite:///{tmp_path / 'shared.db'}"
    script = tmp_path / "keyed.py"
    script.write_text(
        textwrap.dedent(
            """
        import sys
        from wove_adapters import Hub
        from wove_adapters.testing import tasks
        with Hub(environments={"p": {"executor": "process",
                 "delivery_idempotency_key": "shared-key"}},
                 default_environment="p", ledger=sys.argv[2]) as hub:
            print(hub.run(tasks.record, sys.argv[1], "x", 7))
        """
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), ledger],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [o.strip() for o, _ in outputs] == ["14", "14"], outputs
    assert len((tmp_path / "x.runs").read_text().splitlines()) == 1


DIST = "toy_adapter_pkg"


@pytest.fixture
def entry_point_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    pkg = tmp_path / DIST
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
        from wove_adapters.adapters.process import ProcessAdapter

        class ToyAdapter(ProcessAdapter):
            name = "toy"
        """
        )
    )
    info = tmp_path / f"{DIST}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[wove_adapters.adapters]\ntoy = {DIST}:ToyAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh_entry_points()
    yield
    registry.refresh_entry_points()


def test_adapter_installed_through_an_entry_point_is_found(entry_point_package: Any) -> None:
    cls = registry.get_adapter_class("toy")
    assert cls.__name__ == "ToyAdapter" and "toy" in registry.adapter_names()
    with Hub(environments={"t": {"executor": "toy"}}) as hub:
        assert hub.run(tasks.add, 2, environment="t") == 3


def test_unknown_executor_is_a_value_error_suggesting_names() -> None:
    with Hub(environments={"x": {"executor": "celerry"}}) as hub:
        with pytest.raises(ValueError, match="Unknown executor 'celerry'.*Did you mean 'celery'"):
            hub.run(tasks.add, 1, environment="x")


def test_unknown_environment_is_a_name_error() -> None:
    with Hub() as hub, pytest.raises(NameError, match="nowhere"):
        hub.run(tasks.add, 1, environment="nowhere")


class NeedsMissing(ProcessAdapter):
    name = "needs_missing"
    extra = "celery"
    required_modules: ClassVar[tuple[str, ...]] = ("definitely_not_installed_mod",)


def test_missing_backend_library_names_the_extra() -> None:
    registry.register_adapter("needs_missing", NeedsMissing)
    with Hub(environments={"m": {"executor": "needs_missing"}}) as hub:
        with pytest.raises(MissingBackendError, match=r"pip install 'wove-adapters\[celery\]'"):
            hub.run(tasks.add, 1, environment="m")


@pytest.mark.parametrize("name", sorted(registry._BUILTINS))  # every built-in is landed
def test_each_builtin_adapter_names_its_extra_when_its_library_is_absent(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotted, extra = registry._BUILTINS[name]
    if not extra:
        assert registry.get_adapter_class(name).name == name
        return
    import importlib

    cls = getattr(importlib.import_module(dotted.split(":")[0]), dotted.split(":")[1])
    if not cls.required_modules:  # e.g. slurm: it drives Slurm's CLI, no Python library
        assert registry.get_adapter_class(name) is cls
        return
    for module in cls.required_modules:
        monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    with pytest.raises(MissingBackendError, match=rf"pip install 'wove-adapters\[{extra}\]'"):
        registry.get_adapter_class(name)


def test_missing_cloudpickle_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cloudpickle", None)
    with Hub(environments={"s": {"executor": "stdio"}}) as hub:
        with pytest.raises(MissingDispatchFeatureError, match="pip install"):
            hub.run(tasks.add, 1, environment="s")


def test_bad_policy_values_name_the_environment() -> None:
    with pytest.raises(ValueError, match="reports.*require_ack"):
        Hub(environments={"reports": {"executor": "stdio", "delivery_cancel_mode": "maybe"}})
    with pytest.raises(ValueError, match="reports.*requeue"):
        Hub(environments={"reports": {"executor": "stdio", "delivery_orphan_policy": "shrug"}})


def test_impossible_policy_is_rejected_at_environment_start() -> None:
    with Hub(environments={"l": {"executor": "local", "delivery_orphan_policy": "detach"}}) as hub:
        with pytest.raises(UnsupportedPolicyError, match="detach"):
            hub.run(tasks.add, 1, environment="l")


def test_env_var_configuration_reaches_the_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WOVE__ENVIRONMENTS__ENVY__EXECUTOR", "stdio")
    monkeypatch.setenv("WOVE__ENVIRONMENTS__ENVY__EXECUTOR_CONFIG__PROCESSES", "1")
    monkeypatch.setenv("WOVE__DEFAULT_ENVIRONMENT", "envy")
    with Hub() as hub:
        assert hub.run(os.getpid) != os.getpid()
        assert hub.dispatcher("envy").transport.name == "stdio"
