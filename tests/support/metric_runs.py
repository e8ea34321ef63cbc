"""The metrics scenario every backend's metrics test runs: a known mix of runs through a
real executor, then every metric compared with the runs made.

20 runs succeed, 3 fail and 1 is cancelled once the caller has seen it start; one forged
event is posted to the receiver (when the executor has one). Counters, the in-flight
gauge and every histogram's count must then match exactly.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from wove_adapters import Hub
from wove_adapters.testing import tasks

OK, FAILED = 20, 3


def own_registry() -> Iterator[Any]:
    """A registry of the test's own, with the metrics observer counting into it (a test
    module makes it its fixture: ``registry = pytest.fixture(own_registry, name=...)``)."""
    from prometheus_client import CollectorRegistry

    from wove_adapters.observability import metrics

    own = CollectorRegistry()
    metrics.install(registry=own)
    try:
        yield own
    finally:
        metrics.uninstall(own)


def value(registry: Any, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else float(found)


def _wait_started(hub: Hub, environment: str, run_id: str, timeout: float = 60.0) -> None:
    dispatcher = hub.dispatcher(environment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = dispatcher.runs.get(run_id)
        if run is not None and run.started:
            return
        time.sleep(0.02)
    raise AssertionError(f"run {run_id} was never reported started")


def forge_event(hub: Hub, environment: str, run_id: str) -> int:
    """POST a result for ``run_id`` under a signature that is not the key's (a forger
    without the key); returns the HTTP status the receiver answered."""
    from wove_adapters.core import frames, signing
    from wove_adapters.core.codec import sign_events

    dispatcher = hub.dispatcher(environment)
    receiver = dispatcher.transport.receiver  # type: ignore[attr-defined]
    event = frames.TaskResult(run_id=run_id, task_id="add", result=b"x")
    blob = sign_events([event], dispatcher.key_id)
    forged = msgspec.structs.replace(
        blob, signature=bytes([blob.signature[0] ^ 1]) + blob.signature[1:]
    )
    request = urllib.request.Request(
        receiver.url, data=signing.encode_blob(forged), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def run_mix_and_check(
    hub: Hub, registry: Any, environment: str, executor: str, *, receiver: bool,
    sleepy_dir: str,
) -> None:
    where = {"environment": environment, "executor": executor}
    ok = [hub.submit(tasks.add, i) for i in range(OK)]
    bad = [hub.submit(tasks.fail, f"bad {i}") for i in range(FAILED)]
    assert [future.result(timeout=120) for future in ok] == [i + 1 for i in range(OK)]
    for future in bad:
        with pytest.raises(Exception, match="bad"):
            future.result(timeout=120)
    # Submitted last, once the others ended: a backend need not keep submission order
    # (a one-slot Celery worker may take it first and hold the rest behind it).
    slow = hub.submit(tasks.sleepy, sleepy_dir, "cancelled", 60)
    _wait_started(hub, environment, slow.run_id)
    assert value(registry, "wove_adapters_runs_in_flight", **where) == 1
    hub.cancel(slow)
    runs = OK + FAILED + 1
    assert value(registry, "wove_adapters_runs_submitted_total", **where) == runs
    finished = {
        outcome: value(registry, "wove_adapters_runs_finished_total", **where, outcome=outcome)
        for outcome in ("succeeded", "failed", "cancelled", "lost", "timeout")
    }
    assert finished == {"succeeded": OK, "failed": FAILED, "cancelled": 1, "lost": 0,
                        "timeout": 0}
    assert value(registry, "wove_adapters_runs_in_flight", **where) == 0
    assert value(registry, "wove_adapters_requeues_total", **where, cause="lost") == 0
    for outcome, count in (("succeeded", OK), ("failed", FAILED), ("cancelled", 1)):
        labels = {**where, "outcome": outcome}
        assert value(registry, "wove_adapters_end_to_end_seconds_count", **labels) == count
        # Each run's task ran: the time its worker measured (or started -> cancelled).
        assert value(registry, "wove_adapters_run_seconds_count", **labels) == count
        assert value(registry, "wove_adapters_run_seconds_sum", **labels) >= 0
    # One queue wait per attempt: each either said task_started or reported its run time.
    assert value(registry, "wove_adapters_queue_wait_seconds_count", **where) == runs
    slowest = value(registry, "wove_adapters_end_to_end_seconds_sum", **where,
                    outcome="succeeded")
    assert slowest > 0
    if receiver:
        before = value(registry, "wove_adapters_receiver_rejections_total", reason="signature")
        assert forge_event(hub, environment, ok[0].run_id) == 401
        after = value(registry, "wove_adapters_receiver_rejections_total", reason="signature")
        assert after == before + 1
