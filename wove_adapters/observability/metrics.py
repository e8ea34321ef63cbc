"""Prometheus metrics of runs, in a registry the program chooses (``install``).

Names start with ``wove_adapters_``; labels are the environment, the executor and (where
it applies) the outcome, all bounded sets (never a run id, a task argument or a message):

- ``wove_adapters_runs_submitted_total{environment,executor}``: runs accepted (a call
  attached to another run by its idempotency key is not a new run);
- ``wove_adapters_runs_finished_total{environment,executor,outcome}``: runs ended, by
  outcome (``core.observe.OUTCOMES``: succeeded, failed, cancelled, timeout, lost,
  detached);
- ``wove_adapters_runs_in_flight{environment,executor}``: submitted, not yet ended;
- ``wove_adapters_requeues_total{environment,executor,cause}``: attempts that ended
  with another attempt of the same run to follow (``lost``: the orphan policy requeued
  it; ``retry``: a keyed run's task error retried in place);
- ``wove_adapters_queue_wait_seconds{environment,executor}``: from an attempt's
  hand-over to the backend until its task began, as the caller saw it: the arrival of
  ``task_started``, or for a task too short to send one, the arrival of its result less
  the run time its worker reported;
- ``wove_adapters_run_seconds{environment,executor,outcome}``: how long the task of a
  run's last attempt ran: the time its worker measured, else ``task_started`` to the
  end; not observed for an attempt that never reported starting;
- ``wove_adapters_end_to_end_seconds{environment,executor,outcome}``: submit to the
  terminal event, one per run;
- ``wove_adapters_receiver_rejections_total{reason}``: requests the callback receiver
  refused (token, method, not_found, too_large, timeout, unreadable, signature, replayed,
  malformed, wrong_key, unknown_run; the Redis drop box counts its refusals the same way).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wove_adapters.observability import require

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ModuleNotFoundError as _exc:  # pragma: no cover - exercised without the extra
    require("prometheus_client", "metrics", "metrics", _exc)

from wove_adapters.core import observe

if TYPE_CHECKING:
    from wove_adapters.core.runtime import Run

PREFIX = "wove_adapters_"
# From a millisecond task to an hour-long batch job.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
           30.0, 60.0, 300.0, 900.0, 3600.0)
_WHERE = ("environment", "executor")


@dataclass
class _Times:
    submitted: float
    launched: float = 0.0
    started: float | None = None


class MetricsObserver:
    """Counts and times runs into ``registry`` (``core.observe.Observer``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.submitted = Counter(f"{PREFIX}runs_submitted", "Runs accepted.", _WHERE,
                                 registry=registry)
        self.finished = Counter(f"{PREFIX}runs_finished", "Runs ended, by outcome.",
                                (*_WHERE, "outcome"), registry=registry)
        self.in_flight = Gauge(f"{PREFIX}runs_in_flight", "Runs submitted, not yet ended.",
                               _WHERE, registry=registry)
        self.requeues = Counter(f"{PREFIX}requeues",
                                "Attempts followed by another attempt of the same run.",
                                (*_WHERE, "cause"), registry=registry)
        self.queue_wait = Histogram(f"{PREFIX}queue_wait_seconds",
                                    "From hand-over to the backend until the task began.",
                                    _WHERE, buckets=BUCKETS, registry=registry)
        self.run_time = Histogram(f"{PREFIX}run_seconds", "How long the task ran.",
                                  (*_WHERE, "outcome"), buckets=BUCKETS, registry=registry)
        self.end_to_end = Histogram(f"{PREFIX}end_to_end_seconds",
                                    "From submit to the terminal event.",
                                    (*_WHERE, "outcome"), buckets=BUCKETS, registry=registry)
        self.rejections = Counter(f"{PREFIX}receiver_rejections",
                                  "Requests the callback receiver refused, by reason.",
                                  ("reason",), registry=registry)
        self.runs: dict[str, _Times] = {}
        # Labelled children, looked up once per label set (``labels()`` takes a lock and
        # builds a key on every call: a fifth of this observer's cost per run).
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def run_submitted(self, environment: str, executor: str, run: Run) -> None:
        self._child(self.submitted, environment, executor).inc()
        self._child(self.in_flight, environment, executor).inc()
        self.runs[run.run_id] = _Times(time.monotonic())

    def attempt_launched(self, environment: str, executor: str, run: Run) -> None:
        times = self.runs.get(run.run_id)
        if times is not None:
            times.launched, times.started = time.monotonic(), None

    def attempt_started(self, environment: str, executor: str, run: Run) -> None:
        times = self.runs.get(run.run_id)
        if times is not None and times.launched:
            times.started = time.monotonic()
            wait = times.started - times.launched
            self._child(self.queue_wait, environment, executor).observe(wait)

    def attempt_ended(
        self, environment: str, executor: str, run: Run, outcome: str, reason: str
    ) -> None:
        if outcome in ("requeued", "retried") and run.run_id in self.runs:
            cause = "lost" if outcome == "requeued" else "retry"
            self._child(self.requeues, environment, executor, cause).inc()

    def run_ended(
        self, environment: str, executor: str, run: Run, frame: dict[str, Any], outcome: str
    ) -> None:
        times = self.runs.pop(run.run_id, None)
        if times is None:
            return  # not a run of ours (a call answered from another run's outcome)
        now = time.monotonic()
        self._child(self.finished, environment, executor, outcome).inc()
        self._child(self.in_flight, environment, executor).dec()
        self._child(self.end_to_end, environment, executor, outcome).observe(
            now - times.submitted
        )
        run_time = self._child(self.run_time, environment, executor, outcome)
        elapsed = frame.get("elapsed")
        if isinstance(elapsed, (int, float)) and times.launched:
            run_time.observe(float(elapsed))
            if times.started is None:
                wait = max(0.0, now - times.launched - float(elapsed))
                self._child(self.queue_wait, environment, executor).observe(wait)
        elif times.started is not None:
            run_time.observe(now - times.started)

    def receiver_rejected(self, reason: str) -> None:
        self._child(self.rejections, reason).inc()


_installed: dict[int, MetricsObserver] = {}
_servers: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


def install(
    registry: CollectorRegistry | None = None,
    *,
    port: int | None = None,
    addr: str = "127.0.0.1",
) -> MetricsObserver:
    """Count this process's runs into ``registry`` (default: prometheus_client's global
    ``REGISTRY``) from now on; ``port``: also serve it for scraping on ``addr:port``
    (loopback unless told otherwise). Once per registry: a second call returns the
    observer already installed there (and starts the server if it names a new port)."""
    registry = registry if registry is not None else prometheus_client.REGISTRY
    with _lock:
        found = _installed.get(id(registry))
        if found is None or found.registry is not registry:
            found = _installed[id(registry)] = MetricsObserver(registry)
            observe.install(found)
        if port is not None and (addr, port) not in _servers:
            try:
                _servers[(addr, port)] = prometheus_client.start_http_server(
                    port, addr=addr, registry=registry
                )
            except OSError as exc:
                raise OSError(
                    exc.errno, f"metrics cannot be served on {addr}:{port}: "
                    f"{exc.strerror or exc}; set metrics = \"HOST:PORT\" to a free port "
                    f"(or metrics = true and expose the registry yourself)"
                ) from exc
        return found


def uninstall(registry: CollectorRegistry | None = None) -> None:
    """Stop counting into ``registry`` (its metrics stay registered there)."""
    registry = registry if registry is not None else prometheus_client.REGISTRY
    with _lock:
        found = _installed.pop(id(registry), None)
        if found is not None:
            observe.uninstall(found)
