"""The observer seam (``core.observe``): outcome labels, the order of hooks a run gives,
and an observer that raises never touching the run. In-process (the ``local`` executor):
the backends' own tests are tests/integration/*/test_tracing*.py and test_metrics*.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.core import frames, observe
from wove_adapters.core.errors import DeliveryDetachedError, DeliveryTimeoutError


class Recorder:
    """Every hook call, as (hook, run id or reason, extra)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []

    def run_submitted(self, environment: str, executor: str, run: Any) -> None:
        self.calls.append(("run_submitted", run.run_id, f"{environment}/{executor}"))

    def attempt_launched(self, environment: str, executor: str, run: Any) -> None:
        self.calls.append(("attempt_launched", run.run_id, str(run.attempt.attempt)))

    def attempt_started(self, environment: str, executor: str, run: Any) -> None:
        self.calls.append(("attempt_started", run.run_id, ""))

    def attempt_ended(self, environment: str, executor: str, run: Any, outcome: str,
                      reason: str) -> None:
        self.calls.append(("attempt_ended", run.run_id, outcome))

    def run_ended(self, environment: str, executor: str, run: Any, frame: dict[str, Any],
                  outcome: str) -> None:
        self.calls.append(("run_ended", run.run_id, outcome))

    def receiver_rejected(self, reason: str) -> None:
        self.calls.append(("receiver_rejected", reason, ""))


class Broken(Recorder):
    def run_submitted(self, environment: str, executor: str, run: Any) -> None:
        raise RuntimeError("observer bug")

    def run_ended(self, environment: str, executor: str, run: Any, frame: dict[str, Any],
                  outcome: str) -> None:
        raise RuntimeError("observer bug")


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    found = Recorder()
    observe.install(found)
    try:
        yield found
    finally:
        observe.uninstall(found)


def test_outcome_labels_are_a_fixed_set() -> None:
    def error(exc: BaseException, source: str) -> dict[str, Any]:
        return frames.error_event("r", "t", exc, source=source)

    assert observe.outcome_of(frames.event(frames.TASK_RESULT, "r")) == "succeeded"
    assert observe.outcome_of(frames.event(frames.TASK_CANCELLED, "r")) == "cancelled"
    assert observe.outcome_of(error(ValueError("x"), "task")) == "failed"
    assert observe.outcome_of(error(DeliveryTimeoutError("x"), "timeout")) == "timeout"
    assert observe.outcome_of(error(RuntimeError("x"), "orphan")) == "lost"
    assert observe.outcome_of(error(DeliveryDetachedError("x", run_id="r"), "orphan")) == "detached"


def test_a_run_gives_its_hooks_in_order(recorder: Recorder) -> None:
    name = f"observe-{uuid.uuid4().hex[:6]}"
    with Hub(environments={name: {"executor": "local"}}, default_environment=name) as hub:
        future = hub.submit(lambda: 7)
        assert future.result(timeout=30) == 7
    mine = [(hook, extra) for hook, run_id, extra in recorder.calls if run_id == future.run_id]
    assert mine == [
        ("run_submitted", f"{name}/local"),
        ("attempt_launched", "1"),
        ("attempt_started", ""),
        ("attempt_ended", "succeeded"),
        ("run_ended", "succeeded"),
    ]


def test_an_observer_that_raises_never_touches_the_run(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Broken()
    observe.install(broken)
    try:
        name = f"observe-{uuid.uuid4().hex[:6]}"
        with Hub(environments={name: {"executor": "local"}}, default_environment=name) as hub:
            assert hub.run(lambda: 3) == 3
    finally:
        observe.uninstall(broken)
    assert "observer bug" in caplog.text
    assert [hook for hook, _, _ in recorder.calls][-1] == "run_ended"  # the others ran


def test_installing_twice_installs_once(recorder: Recorder) -> None:
    observe.install(recorder)
    assert observe.observers.count(recorder) == 1
