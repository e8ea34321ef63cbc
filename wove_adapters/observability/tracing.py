"""OpenTelemetry traces of runs: the caller's spans, and the worker's child span.

In the caller (``install()``, or the setting ``tracing = true``) each run is a span
``run <task>`` from submit to its terminal event, a child of whatever span is current
where the run was submitted. Each attempt of it is a child span ``attempt <task>`` from
its hand-over to the backend to its end (a requeue or in-place retry ends one attempt
span and starts the next under the same run span); its W3C trace context
(``traceparent``, ``tracestate``) rides in the signed payload (``Envelope.trace``, the
stdio ``run_task`` frame). Queue wait is the gap between an attempt span's start and its
worker span's start, and the attempt span carries a ``task_started`` event when the
worker said so (tasks shorter than 50 ms say only their outcome).

On the worker, ``task_span`` starts ``task <task>`` as the attempt span's child (kind
CONSUMER) and makes it current, so spans the task's own code starts nest under it. A
worker exports spans only if an SDK is configured in it: by the worker's own start-up
code, or by ``WOVE_ADAPTERS_TRACING_INIT=module:function``, which the worker calls once,
before its first traced task. Without opentelemetry-api on the worker nothing happens.

Spans are made with the tracer provider given to ``install`` (default: the global one,
``opentelemetry.trace.set_tracer_provider``); nothing here configures an exporter.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wove_adapters.observability import require

try:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ModuleNotFoundError as _exc:  # pragma: no cover - exercised without the extra
    require("opentelemetry", "tracing", "otel", _exc)

from wove_adapters.core import observe

if TYPE_CHECKING:
    from wove_adapters.core.runtime import Run

INIT_ENV = "WOVE_ADAPTERS_TRACING_INIT"
# W3C trace context whatever propagator the program configured globally: the payload
# field is named for it, and the worker reads it back the same way.
_PROPAGATOR = TraceContextTextMapPropagator()
_ERROR_OUTCOMES = frozenset({"failed", "timeout", "lost", "requeued", "retried", "refused"})


@dataclass
class _Spans:
    run: trace.Span
    attempt: trace.Span | None = None


class TracingObserver:
    """The caller's spans of runs (``core.observe.Observer``)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self.tracer = trace.get_tracer("wove_adapters", tracer_provider=tracer_provider)
        self.runs: dict[str, _Spans] = {}

    def run_submitted(self, environment: str, executor: str, run: Run) -> None:
        attempt = run.attempt
        attributes: dict[str, Any] = {
            "wove.environment": environment,
            "wove.executor": executor,
            "wove.task_id": attempt.task_id,
            "wove.run_id": attempt.run_id,
        }
        if attempt.idempotency_key is not None:
            attributes["wove.idempotency_key"] = attempt.idempotency_key
        # No context given: the caller's current one (it travels with the coroutine
        # onto the shared loop) is the parent.
        span = self.tracer.start_span(f"run {attempt.task_id}", attributes=attributes)
        self.runs[attempt.run_id] = _Spans(span)

    def attempt_launched(self, environment: str, executor: str, run: Run) -> None:
        spans = self.runs.get(run.run_id)
        if spans is None:
            return
        if spans.attempt is not None:  # ended without a hook (cannot happen; be safe)
            spans.attempt.end()
        attempt = run.attempt
        span = self.tracer.start_span(
            f"attempt {attempt.task_id}",
            context=trace.set_span_in_context(spans.run),
            kind=SpanKind.PRODUCER,
            # The rest (environment, executor, task, key) is on the run span.
            attributes={"wove.run_id": attempt.run_id, "wove.attempt": attempt.attempt},
        )
        spans.attempt = span
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        if carrier:  # a non-recording span (no SDK in the caller) carries nothing
            attempt.extra["trace"] = carrier
        else:
            attempt.extra.pop("trace", None)

    def attempt_started(self, environment: str, executor: str, run: Run) -> None:
        spans = self.runs.get(run.run_id)
        if spans is not None and spans.attempt is not None:
            spans.attempt.add_event("task_started")

    def attempt_ended(
        self, environment: str, executor: str, run: Run, outcome: str, reason: str
    ) -> None:
        spans = self.runs.get(run.run_id)
        if spans is None or spans.attempt is None:
            return
        _close(spans.attempt, outcome, reason)
        spans.attempt = None

    def run_ended(
        self, environment: str, executor: str, run: Run, frame: dict[str, Any], outcome: str
    ) -> None:
        spans = self.runs.pop(run.run_id, None)
        if spans is None:
            return
        spans.run.set_attribute("wove.attempts", run.attempt.attempt)
        error = frame.get("error") or {}
        reason = f"{error.get('kind', '')}: {error.get('message', '')}" if error else ""
        _close(spans.run, outcome, reason)

    def receiver_rejected(self, reason: str) -> None:
        pass


def _close(span: trace.Span, outcome: str, reason: str) -> None:
    span.set_attribute("wove.outcome", outcome)
    if outcome in _ERROR_OUTCOMES:
        span.set_status(Status(StatusCode.ERROR, reason[:512] or outcome))
    span.end()


_installed: TracingObserver | None = None
_lock = threading.Lock()


def install(tracer_provider: trace.TracerProvider | None = None) -> TracingObserver:
    """Trace every run of this process from now on (once: a second call returns the
    observer already installed)."""
    global _installed
    with _lock:
        if _installed is None:
            _installed = TracingObserver(tracer_provider)
            observe.install(_installed)
        return _installed


def uninstall() -> None:
    """Stop tracing runs (spans of runs in flight are not ended)."""
    global _installed
    with _lock:
        if _installed is not None:
            observe.uninstall(_installed)
            _installed = None


# ---------------------------------------------------------------- the worker side

_initialized: set[int] = set()
_init_lock = threading.Lock()


def _init_worker() -> None:
    """Call ``WOVE_ADAPTERS_TRACING_INIT`` (``module:function``) once per process."""
    pid = os.getpid()
    if pid in _initialized:
        return
    with _init_lock:
        if pid in _initialized:
            return
        _initialized.add(pid)
        target = os.environ.get(INIT_ENV, "").strip()
        if not target:
            return
        module, _, name = target.partition(":")
        try:
            hook = getattr(importlib.import_module(module), name or "init")
            hook()
        except Exception as exc:
            print(f"wove-adapters worker: {INIT_ENV}={target!r} failed: "
                  f"{type(exc).__name__}: {exc}; spans are not exported", file=sys.stderr)


Ended = Callable[[str, "BaseException | None"], None]


@contextmanager
def task_span(
    carrier: dict[str, str], *, run_id: str, task_id: str, attempt: int, executor: str
) -> Iterator[Ended]:
    """The worker's span of one attempt, current while the task runs; call the yielded
    function with the outcome (a ``RunState`` value) and the task's error, if any."""
    _init_worker()
    parent = _PROPAGATOR.extract(carrier)
    tracer = trace.get_tracer("wove_adapters.worker")
    with tracer.start_as_current_span(
        f"task {task_id}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "wove.run_id": run_id,
            "wove.task_id": task_id,
            "wove.attempt": attempt,
            "wove.executor": executor,
            "process.pid": os.getpid(),
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:

        def ended(outcome: str, error: BaseException | None) -> None:
            span.set_attribute("wove.outcome", outcome)
            if error is not None and outcome != "cancelled":
                span.record_exception(error)
            if outcome in _ERROR_OUTCOMES:
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"
                                       if error is not None else outcome))

        yield ended
