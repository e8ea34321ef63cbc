"""OpenTelemetry traces across a real Celery worker (Redis broker, prefork children).

The caller keeps its spans in memory; the worker's children export theirs to a file
(the ``traced_celery`` fixture). One trace: caller span -> run -> attempt(s) -> the task
span on the worker; a prefork child killed mid-task under ``requeue`` gives two attempt
spans under one run span.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import CeleryService
from extras import need
from otel_spans import (
    check_requeued,
    one_trace,
    tracing_on,
)

need("opentelemetry.sdk", "pip install -e '.[otel,dev]' (tox installs it in this file's env)")


traced = pytest.fixture(tracing_on, name="traced")


def hub_for(service: CeleryService, **settings: Any) -> Hub:
    definition = {"executor": "celery", "executor_config": service.executor_config, **settings}
    return Hub(environments={"celery-traced": definition}, default_environment="celery-traced")


def test_caller_and_worker_spans_share_one_trace(
    traced_celery: tuple[CeleryService, Path], traced: None
) -> None:
    from opentelemetry import trace

    service, spans = traced_celery
    with hub_for(service) as hub, trace.get_tracer("test").start_as_current_span("request"):
        future = hub.submit(tasks.add, 1, y=2)
        assert future.result(timeout=60) == 3
    run, _, workers = one_trace(future.run_id, spans)
    assert run["attributes"]["wove.executor"] == "celery"
    assert run["attributes"]["wove.environment"] == "celery-traced"
    assert run["attributes"]["wove.outcome"] == "succeeded"
    assert workers[0]["attributes"]["wove.executor"] == "celery"
    assert workers[0]["pid"] != service.process.pid  # type: ignore[union-attr]


def test_a_requeue_is_a_second_attempt_span_under_the_same_run(
    traced_celery: tuple[CeleryService, Path], traced: None, tmp_path: Path
) -> None:
    service, spans = traced_celery
    with hub_for(service, delivery_orphan_policy="requeue",
                 delivery_heartbeat_seconds=2.0) as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "celery-rq")
        os.kill(int(wait_for_file(tmp_path / "celery-rq.pid", 60)), signal.SIGKILL)
        assert future.result(timeout=120) == "celery-rq-done"
    check_requeued(future.run_id, spans)
