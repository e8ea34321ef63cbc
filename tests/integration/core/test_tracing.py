"""OpenTelemetry traces across real worker processes (process and stdio executors).

The caller keeps its spans in memory (SDK in-memory exporter); each worker process
exports its own to a file (``WOVE_ADAPTERS_TRACING_INIT=otel_spans:init``, see
tests/support/otel_spans.py). No network. Each test checks one trace: the caller's span
-> the run span -> attempt span(s) -> the worker's span, in another process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from extras import need
from lazy_imports import blocked
from otel_spans import (
    check_requeued,
    one_trace,
    tracing_on,
    worker_env,
)

need("opentelemetry.sdk", "pip install -e '.[otel,dev]' (tox installs it in this file's env)")

EXECUTORS = ("process", "stdio")


traced = pytest.fixture(tracing_on, name="traced")


def hub_for(executor: str, spans: Path, **settings: Any) -> Hub:
    config: dict[str, Any] = {"env": worker_env(spans)}
    if executor == "stdio":
        config["processes"] = 1
    definition = {"executor": executor, "executor_config": config, **settings}
    return Hub(environments={"traced": definition}, default_environment="traced")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_caller_and_worker_spans_share_one_trace(
    executor: str, tmp_path: Path, traced: Any
) -> None:
    from opentelemetry import trace

    spans = tmp_path / "spans.jsonl"
    tracer = trace.get_tracer("test")
    # A key of its own: the ledger is shared by the session's tests.
    key = f"add-{uuid.uuid4().hex[:8]}-{{x}}"
    with hub_for(executor, spans, delivery_idempotency_key=key) as hub:
        with tracer.start_as_current_span("request"):
            future = hub.submit(tasks.add, 41, y=1)
        assert future.result(timeout=60) == 42
    run, attempts, workers = one_trace(future.run_id, spans)
    assert run["attributes"]["wove.environment"] == "traced"
    assert run["attributes"]["wove.executor"] == executor
    assert run["attributes"]["wove.outcome"] == "succeeded"
    assert run["attributes"]["wove.attempts"] == 1
    assert run["attributes"]["wove.idempotency_key"].endswith(key.format(x=41))
    assert run["name"] == "run add" and run["status"] == "UNSET"
    assert attempts[0]["attributes"]["wove.attempt"] == 1
    assert attempts[0]["attributes"]["wove.outcome"] == "succeeded"
    assert workers[0]["attributes"]["wove.outcome"] == "succeeded"
    # The caller's span covers the worker's: submit before the task began, end after.
    assert run["start"] <= attempts[0]["start"] <= workers[0]["start"]
    assert workers[0]["end"] <= attempts[0]["end"] <= run["end"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_failed_run_is_an_error_on_every_span(
    executor: str, tmp_path: Path, traced: Any
) -> None:
    spans = tmp_path / "spans.jsonl"
    with hub_for(executor, spans) as hub:
        future = hub.submit(tasks.fail, "no luck")
        with pytest.raises(Exception, match="no luck"):
            future.result(timeout=60)
    run, attempts, workers = one_trace(future.run_id, spans, request=None)
    for span in (run, *attempts, *workers):
        assert span["status"] == "ERROR", span
        assert span["attributes"]["wove.outcome"] == "failed"
    assert "exception" in workers[0]["events"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_requeue_is_a_second_attempt_span_under_the_same_run(
    executor: str, tmp_path: Path, traced: Any
) -> None:
    spans = tmp_path / "spans.jsonl"
    with hub_for(executor, spans, delivery_orphan_policy="requeue") as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "rq")
        os.kill(int(wait_for_file(tmp_path / "rq.pid")), signal.SIGKILL)
        assert future.result(timeout=60) == "rq-done"
    check_requeued(future.run_id, spans)


def test_untraced_runs_carry_no_trace_context(tmp_path: Path) -> None:
    """Tracing off: no trace context in the payload, no worker span even where the
    worker could export one."""
    spans = tmp_path / "spans.jsonl"
    with hub_for("stdio", spans) as hub:
        assert hub.run(tasks.add, 1) == 2
    assert not spans.exists()


def test_without_the_extra_nothing_is_imported_and_asking_names_it(tmp_path: Path) -> None:
    """A process without opentelemetry runs as before, imports nothing of it, and
    ``tracing = true`` fails naming the extra; a worker without it runs a traced payload
    untraced (the stdio pool's workers here block it too)."""
    code = blocked("opentelemetry") + """
from wove_adapters import Hub
from wove_adapters.observability import ObservabilityExtraMissing
definition = {"executor": "stdio", "executor_config": {"processes": 1}}
with Hub(environments={"w": definition}, default_environment="w") as hub:
    assert hub.run(lambda: 5) == 5
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
try:
    Hub(environments={"t": definition}, default_environment="t", tracing=True).run(lambda: 1)
except ObservabilityExtraMissing as exc:
    assert "pip install 'wove-adapters[otel]'" in str(exc), exc
else:
    raise AssertionError("tracing=True without opentelemetry did not fail")
import wove_adapters.worker.runner as runner
with runner.task_span({"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
                      "r", "t", 1, "stdio") as ended:
    ended("succeeded", None)
assert not [m for m in sys.modules if m.startswith("opentelemetry")]
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
