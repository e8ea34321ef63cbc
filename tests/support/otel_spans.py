"""Spans exported to a file, for tests whose spans come from worker processes.

``init`` is what a worker names in ``WOVE_ADAPTERS_TRACING_INIT=otel_spans:init``: it sets
an OpenTelemetry SDK tracer provider whose spans are written, one JSON line each, to the
file ``WOVE_TEST_SPANS_FILE`` names, as each span ends (a simple processor: nothing is
lost when the worker process exits right after its task). Appends of one short line from
several processes do not interleave (O_APPEND). No network anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SPANS_FILE_ENV = "WOVE_TEST_SPANS_FILE"


def span_record(span: Any) -> dict[str, Any]:
    """What the tests read of a span (an SDK ``ReadableSpan``)."""
    context = span.get_span_context()
    parent = span.parent
    return {
        "name": span.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "events": [event.name for event in span.events],
        "status": span.status.status_code.name,
        "start": span.start_time,
        "end": span.end_time,
        "pid": os.getpid(),
    }


def init() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

    path = os.environ[SPANS_FILE_ENV]

    class FileExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> Any:
            from opentelemetry.sdk.trace.export import SpanExportResult

            lines = "".join(json.dumps(span_record(span)) + "\n" for span in spans)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, lines.encode())
            finally:
                os.close(fd)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(FileExporter()))
    trace.set_tracer_provider(provider)


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


SUPPORT_DIR = Path(__file__).resolve().parent
_exporter: Any = None


def caller_exporter() -> Any:
    """This process's spans, kept in memory: an SDK provider set once per process (the
    global provider can be set only once) with an in-memory exporter."""
    global _exporter
    if _exporter is None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
            InMemorySpanExporter,
        )

        provider = TracerProvider()
        _exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    return _exporter


def tracing_on() -> Iterator[None]:
    """Runs traced (the caller's spans kept in memory, cleared first) for one test; a
    test module makes it its fixture: ``traced = pytest.fixture(tracing_on, name=...)``."""
    from wove_adapters.observability import tracing

    caller_exporter().clear()
    tracing.install()
    try:
        yield
    finally:
        tracing.uninstall()


def caller_spans() -> list[dict[str, Any]]:
    return [span_record(span) for span in caller_exporter().get_finished_spans()]


def worker_env(path: Path) -> dict[str, str]:
    """The environment variables that make a worker process export its spans to ``path``."""
    return {
        "WOVE_ADAPTERS_TRACING_INIT": "otel_spans:init",
        SPANS_FILE_ENV: str(path),
        "PYTHONPATH": os.pathsep.join(
            [str(SUPPORT_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }


def wait_for_spans(
    path: Path, run_id: str, count: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The worker spans of ``run_id`` once there are ``count`` of them."""
    import time

    deadline = time.monotonic() + timeout
    found: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        found = [s for s in read_spans(path) if s["attributes"].get("wove.run_id") == run_id]
        if len(found) >= count:
            return found
        time.sleep(0.02)
    raise AssertionError(f"{len(found)} worker spans of run {run_id} in {path}, expected {count}")


def run_trace(run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The caller's run span of ``run_id`` and its attempt spans, in attempt order."""
    mine = [s for s in caller_spans() if s["attributes"].get("wove.run_id") == run_id]
    runs = [s for s in mine if s["name"].startswith("run ")]
    assert len(runs) == 1, f"expected one run span of {run_id}, got {mine}"
    attempts = sorted((s for s in mine if s["name"].startswith("attempt ")),
                      key=lambda s: s["attributes"]["wove.attempt"])
    return runs[0], attempts


def check_linked(
    request: dict[str, Any] | None, run: dict[str, Any], attempts: list[dict[str, Any]],
    workers: list[dict[str, Any]],
) -> None:
    """One trace: request -> run -> attempt(s); each worker span a child of its attempt,
    in another process."""
    trace_id = run["trace_id"]
    if request is not None:
        assert run["trace_id"] == request["trace_id"]
        assert run["parent_id"] == request["span_id"], "the run span is not the caller's child"
    by_id = {a["span_id"]: a for a in attempts}
    for attempt in attempts:
        assert attempt["trace_id"] == trace_id
        assert attempt["parent_id"] == run["span_id"], "an attempt span is not the run's child"
        assert attempt["kind"] == "PRODUCER"
    for worker in workers:
        assert worker["trace_id"] == trace_id, "the worker span is in another trace"
        assert worker["parent_id"] in by_id, "the worker span's parent is not an attempt span"
        assert worker["kind"] == "CONSUMER"
        assert worker["pid"] != os.getpid(), "the worker span was made in the caller"
        assert (worker["attributes"]["wove.attempt"]
                == by_id[worker["parent_id"]]["attributes"]["wove.attempt"])


def check_requeued(run_id: str, spans: Path) -> None:
    """A run whose first attempt's worker was killed under ``requeue``: two attempt
    spans under one run span, the first ended ``requeued``; only the second attempt's
    worker span exported (the killed worker never ended its own)."""
    workers = wait_for_spans(spans, run_id, 1)
    run, attempts = run_trace(run_id)
    check_linked(None, run, attempts, workers)
    assert [a["attributes"]["wove.attempt"] for a in attempts] == [1, 2]
    assert attempts[0]["attributes"]["wove.outcome"] == "requeued"
    assert attempts[0]["status"] == "ERROR"
    assert attempts[1]["attributes"]["wove.outcome"] == "succeeded"
    assert run["attributes"]["wove.attempts"] == 2
    assert run["attributes"]["wove.outcome"] == "succeeded"
    assert len(workers) == 1 and workers[0]["attributes"]["wove.attempt"] == 2
    assert workers[0]["parent_id"] == attempts[1]["span_id"]


def one_trace(
    run_id: str, spans: Path, request: str | None = "request"
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The run span, attempt spans and worker spans of a run with one attempt, checked
    linked into one trace (under the caller's span named ``request``, if given)."""
    workers = wait_for_spans(spans, run_id, 1)
    run, attempts = run_trace(run_id)
    parent = None if request is None else next(
        s for s in caller_spans() if s["name"] == request
    )
    check_linked(parent, run, attempts, workers)
    assert len(attempts) == 1 and len(workers) == 1, (attempts, workers)
    return run, attempts, workers
