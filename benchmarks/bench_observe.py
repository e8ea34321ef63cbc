"""The cost of traces and metrics per run: the same Hub and stdio pool with observability
off, metrics on, tracing on, and both, taking turns in one run.

Work: ``add(x) -> x + 1`` on ``--processes`` warm stdio workers. Sides switch observers
on and off between samples (``core.observe``), so every side shares the same processes,
loop and ledger. Tracing: the caller has an SDK tracer provider with a batch processor
and an exporter that drops what it gets (the cost of making and ending spans, not of a
network); the workers set up the same in ``worker_init`` (``WOVE_ADAPTERS_TRACING_INIT``),
and make a span only for payloads that carry trace context. Metrics: a registry of the
benchmark's own. Figures per side: p50/p99 of sequential round trips, throughput of
bursts, caller and worker CPU per task over the bursts; ratios against "off".

Prints one JSON line: ``{"kind": "observe", "sides": {...}, "ratios": {...}}``.

    python benchmarks/bench_observe.py [--seq 200] [--burst 1000] [--rounds 3]
                                       [--processes 2]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CpuMeter, alternate, emit, hub_calls, log, ratio, speed_arguments, summarize

MODES = ("off", "metrics", "tracing", "both")


def _drop_provider(*, simple: bool = False) -> Any:
    """An SDK provider whose exporter drops spans; ``simple``: export each span as it
    ends (the hook timings below: a batch processor's queue would overflow and drop)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Drop(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Drop()) if simple
                                else BatchSpanProcessor(Drop()))
    return provider


def hook_costs(count: int = 20_000, repeats: int = 5) -> dict[str, Any]:
    """CPU per run of each observer's hooks alone (a run's five calls, best of
    ``repeats``), and of the worker's span per task, traced and not: the figures the
    machine's load cannot blur."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    from prometheus_client import CollectorRegistry

    from wove_adapters.core.policies import DeliveryPolicy
    from wove_adapters.core.runtime import Run
    from wove_adapters.core.transport import RunAttempt
    from wove_adapters.observability import metrics, tracing
    from wove_adapters.worker.runner import task_span

    policy = DeliveryPolicy()
    frame = {"type": "task_result", "elapsed": 0.001}

    def per_run(observer: Any) -> float:
        runs = [Run(attempt=RunAttempt(run_id=f"r{i}", task_id="add", func=None, args={},
                                       policy=policy)) for i in range(count)]
        start = time.process_time()
        for run in runs:
            observer.run_submitted("e", "stdio", run)
            observer.attempt_launched("e", "stdio", run)
            observer.attempt_started("e", "stdio", run)
            observer.attempt_ended("e", "stdio", run, "succeeded", "")
            observer.run_ended("e", "stdio", run, frame, "succeeded")
        return (time.process_time() - start) / count * 1e6

    def per_task(carrier: dict[str, str] | None) -> float:
        start = time.process_time()
        for _ in range(count):
            with task_span(carrier, "r", "add", 1, "stdio") as ended:
                ended("succeeded", None)
        return (time.process_time() - start) / count * 1e6

    provider = _drop_provider(simple=True)
    trace.set_tracer_provider(provider)  # the worker span's tracer is the global one
    carrier: dict[str, str] = {}
    parent = provider.get_tracer("bench").start_span("parent")
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(parent))
    observers = {"metrics": metrics.MetricsObserver(CollectorRegistry()),
                 "tracing": tracing.TracingObserver(provider)}
    return {
        "kind": "observe_hooks",
        "caller_cpu_us_per_run": {name: round(min(per_run(o) for _ in range(repeats)), 1)
                                  for name, o in observers.items()},
        "worker_cpu_us_per_task": {
            "traced": round(min(per_task(carrier) for _ in range(repeats)), 1),
            "untraced_payload": round(min(per_task(None) for _ in range(repeats)), 2),
        },
        "how": f"each observer's five hooks of a run, {count} runs, best of {repeats}; "
               "the worker's task_span per task (SDK provider, simple processor, dropping "
               "exporter); with no observer installed a hook site is one truth test",
    }


def worker_init() -> None:
    """``WOVE_ADAPTERS_TRACING_INIT=bench_observe:worker_init``: an SDK in the worker."""
    from opentelemetry import trace

    trace.set_tracer_provider(_drop_provider())


def main() -> None:
    parser = speed_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-observe-"))
    from prometheus_client import CollectorRegistry

    from wove_adapters.core import observe
    from wove_adapters.integration.hub import Hub
    from wove_adapters.observability import metrics, tracing
    from wove_adapters.testing.tasks import add

    here = str(Path(__file__).resolve().parent)
    env = {"WOVE_ADAPTERS_TRACING_INIT": "bench_observe:worker_init",
           "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}
    hub = Hub(environments={"observe": {"executor": "stdio", "executor_config": {
        "processes": args.processes, "env": env}}}, default_environment="observe")
    tracer = tracing.TracingObserver(_drop_provider())
    counter = metrics.MetricsObserver(CollectorRegistry())
    installed = {"off": (), "metrics": (counter,), "tracing": (tracer,),
                 "both": (counter, tracer)}

    def switched(mode: str, call: Callable[[int], Any]) -> Callable[[int], Any]:
        def run(x: int) -> Any:
            observe.observers[:] = list(installed[mode])
            return call(x)
        return run

    try:
        one, many = hub_calls(hub, add)
        assert hub.run(add, 1) == 2
        transport = hub.dispatcher("observe").transport
        meter = CpuMeter(args.burst, lambda: list(transport.pids))  # type: ignore[attr-defined]
        sides = {mode: (switched(mode, one), meter.wrap(mode, switched(mode, many)))
                 for mode in MODES}
        log(f"observe: {args.seq} round trips and {args.rounds} bursts of {args.burst} per side")
        measured = alternate(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                             warmup=args.warmup)
    finally:
        observe.observers[:] = []
        hub.close()
    emit(hook_costs())
    figures = {mode: {**summarize(*measured[mode]), **meter.figures(mode)} for mode in MODES}
    base = figures["off"]
    emit({
        "kind": "observe",
        "backend": "stdio",
        "sides": figures,
        "ratios": {mode: {
            "p50": ratio(figures[mode]["p50_ms"], base["p50_ms"]),
            "throughput": ratio(figures[mode]["throughput_per_s"], base["throughput_per_s"]),
            "caller_cpu": ratio(figures[mode].get("caller_cpu_us_per_task"),
                                base.get("caller_cpu_us_per_task")),
            "worker_cpu": ratio(figures[mode].get("worker_cpu_us_per_task"),
                                base.get("worker_cpu_us_per_task")),
        } for mode in MODES if mode != "off"},
        "settings": {"seq": args.seq, "burst": args.burst, "rounds": args.rounds,
                     "processes": args.processes},
        "how": "one Hub, stdio executor; observers switched between samples; tracing with "
               "an SDK provider (batch processor, dropping exporter) in caller and workers",
    })


if __name__ == "__main__":
    main()
