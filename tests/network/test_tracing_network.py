"""Traces through the network executors: the attempt's W3C trace context rides in the
``run_task`` frame's ``delivery`` (authenticated with the frame), and ``wove-adapters
serve`` starts the task's span on its payload process as the attempt span's child. The
service's payload processes export their spans to a file
(``WOVE_ADAPTERS_TRACING_INIT``, tests/support/otel_spans.py); the caller keeps its own
in memory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.testing import tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from extras import need
from otel_spans import one_trace, tracing_on, worker_env

need("opentelemetry.sdk", "pip install -e '.[otel,dev]' (tox installs it in this file's env)")
traced = pytest.fixture(tracing_on, name="traced")


@pytest.mark.parametrize("transport", ["http", "websocket"])
def test_caller_and_service_spans_share_one_trace(
    transport: str, serve: Callable[..., Any], tmp_path: Path, traced: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace

    spans = tmp_path / "spans.jsonl"
    for name, value in worker_env(spans).items():
        monkeypatch.setenv(name, value)  # what the service process starts with
    served = serve(transport)
    definition = {"executor": transport, "executor_config": served.executor_config()}
    name = f"traced-{transport}"
    with Hub(environments={name: definition}, default_environment=name) as hub, \
            trace.get_tracer("test").start_as_current_span("request"):
        future = hub.submit(tasks.add, 20, y=22)
        assert future.result(timeout=60) == 42
    run, _, workers = one_trace(future.run_id, spans)
    assert run["attributes"]["wove.executor"] == transport
    assert workers[0]["attributes"]["wove.executor"] == "serve"
    assert workers[0]["pid"] != served.pid, "the task ran in the service's own process"
