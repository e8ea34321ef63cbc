"""Prometheus metrics of runs through real worker processes (process and stdio).

Each test counts into a registry of its own (``metrics.install(registry=...)``) and
compares every metric with the runs it made (tests/support/metric_runs.py); the setting
``metrics = "HOST:PORT"`` is checked by scraping the port of a fresh interpreter.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.testing import tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from extras import need
from lazy_imports import blocked
from metric_runs import own_registry, run_mix_and_check, value

need("prometheus_client", "pip install -e '.[metrics]' (tox installs it in this file's env)")
registry = pytest.fixture(own_registry, name="registry")


@pytest.mark.parametrize("executor", ["process", "stdio"])
def test_metric_values_match_the_runs_made(executor: str, registry: Any, tmp_path: Path) -> None:
    config: dict[str, Any] = {"processes": 2} if executor == "stdio" else {}
    environment = f"metrics-{executor}"
    definition = {"executor": executor, "executor_config": config}
    with Hub(environments={environment: definition}, default_environment=environment) as hub:
        run_mix_and_check(hub, registry, environment, executor,
                          receiver=executor == "process", sleepy_dir=str(tmp_path))


def test_a_requeue_is_counted(registry: Any, tmp_path: Path) -> None:
    import os
    import signal

    from wove_adapters.testing.conformance import wait_for_file

    where = {"environment": "metrics-requeue", "executor": "stdio"}
    definition = {"executor": "stdio", "executor_config": {"processes": 1},
                  "delivery_orphan_policy": "requeue"}
    with Hub(environments={"metrics-requeue": definition},
             default_environment="metrics-requeue") as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "rq")
        os.kill(int(wait_for_file(tmp_path / "rq.pid")), signal.SIGKILL)
        assert future.result(timeout=60) == "rq-done"
    assert value(registry, "wove_adapters_requeues_total", **where, cause="lost") == 1
    assert value(registry, "wove_adapters_runs_submitted_total", **where) == 1
    assert value(registry, "wove_adapters_runs_finished_total", **where,
                 outcome="succeeded") == 1
    assert value(registry, "wove_adapters_runs_in_flight", **where) == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_setting_serves_the_metrics_on_the_port_asked() -> None:
    port = _free_port()
    code = f"""
import urllib.request
from wove_adapters import Hub
definition = {{"executor": "stdio", "executor_config": {{"processes": 1}}}}
with Hub(environments={{"w": definition}}, default_environment="w",
         metrics="127.0.0.1:{port}") as hub:
    assert [hub.run(lambda i=i: i) for i in range(3)] == [0, 1, 2]
text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
print(text)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert ('wove_adapters_runs_finished_total{environment="w",executor="stdio",'
            'outcome="succeeded"} 3.0') in lines, done.stdout
    assert 'wove_adapters_runs_in_flight{environment="w",executor="stdio"} 0.0' in lines


def test_bad_settings_and_a_missing_extra_say_what_to_do() -> None:
    from prometheus_client import CollectorRegistry

    from wove_adapters.observability import metrics, metrics_target

    own = CollectorRegistry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"127.0.0.1:{port}.*HOST:PORT"):
                metrics.install(own, port=port)
        finally:
            metrics.uninstall(own)

    assert metrics_target(True) is None
    assert metrics_target("port:9464") == ("127.0.0.1", 9464)
    assert metrics_target(9464) == ("127.0.0.1", 9464)
    assert metrics_target("0.0.0.0:9464") == ("0.0.0.0", 9464)
    for bad in ("port:x", 70000, [1]):
        with pytest.raises(ValueError, match="metrics must be true"):
            metrics_target(bad)
    code = blocked("prometheus_client") + """
from wove_adapters.observability import ObservabilityExtraMissing
try:
    import wove_adapters.observability.metrics
except ObservabilityExtraMissing as exc:
    assert "pip install 'wove-adapters[metrics]'" in str(exc), exc
    print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
