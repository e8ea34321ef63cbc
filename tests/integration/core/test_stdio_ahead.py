"""stdio sends a busy worker its next run ahead (``AHEAD``): real worker processes show
that such a run, waiting inside the worker, can still be cancelled without ever starting,
and that a worker killed with one running and one waiting loses neither."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


def hold(directory: str, tag: str) -> str:
    """Writes ``<tag>.started``, then runs until ``<tag>.go`` exists."""
    Path(directory, f"{tag}.started").write_text(str(os.getpid()))
    while not Path(directory, f"{tag}.go").exists():
        time.sleep(0.01)
    return tag


def one_worker_hub(**settings: Any) -> Hub:
    definition = {"executor": "stdio", "executor_config": {"processes": 1}, **settings}
    return Hub(environments={"w": definition}, default_environment="w")


def sent_to_worker(hub: Hub, count: int, timeout: float = 30.0) -> list[str]:
    """The run ids the only worker holds, once it holds ``count`` of them: the second
    one waits in the worker, not in the caller's queue."""
    transport: Any = hub.dispatcher("w").transport
    deadline = time.monotonic() + timeout
    while True:
        (worker,) = transport._workers
        held = [run.run_id for run in worker.runs]
        if len(held) == count and not transport._pending:
            return held
        assert time.monotonic() < deadline, f"the worker holds {held}, not {count} runs"
        time.sleep(0.01)


def test_a_run_waiting_in_the_worker_is_cancelled_before_it_starts(tmp_path: Path) -> None:
    with one_worker_hub(delivery_cancel_mode="require_ack") as hub:
        running = hub.submit(hold, str(tmp_path), "first")
        wait_for_file(tmp_path / "first.started")
        waiting = hub.submit(tasks.record, str(tmp_path), "queued", 1)
        assert sent_to_worker(hub, 2)[1] == waiting.run_id
        hub.cancel(waiting)  # require_ack: resolved by the worker's task_cancelled
        with pytest.raises(concurrent.futures.CancelledError):
            waiting.result(timeout=10)
        (tmp_path / "first.go").touch()
        assert running.result(timeout=30) == "first"
        # The worker is free and runs what comes next; the cancelled run never ran.
        assert hub.run(tasks.add, 41) == 42
    assert not (tmp_path / "queued.runs").exists()


def test_cancelling_the_running_run_starts_the_waiting_one(tmp_path: Path) -> None:
    with one_worker_hub(delivery_cancel_mode="require_ack") as hub:
        running = hub.submit(tasks.sleepy, str(tmp_path), "long", 60.0)
        wait_for_file(tmp_path / "long.started")
        waiting = hub.submit(tasks.record, str(tmp_path), "next", 2)
        sent_to_worker(hub, 2)
        hub.cancel(running)
        with pytest.raises(concurrent.futures.CancelledError):
            running.result(timeout=10)
        assert waiting.result(timeout=30) == 4
    assert not (tmp_path / "long.finished").exists()
    assert len((tmp_path / "next.runs").read_text().splitlines()) == 1


def kill_with_one_waiting(hub: Hub, tmp_path: Path) -> tuple[Any, Any, int]:
    """A running task and one waiting behind it on the same worker, whose process is then
    SIGKILLed: (the running run, the waiting one, the killed pid)."""
    running = hub.submit(tasks.die_once, str(tmp_path), "victim")
    pid = int(wait_for_file(tmp_path / "victim.pid"))
    waiting = hub.submit(tasks.record, str(tmp_path), "bystander", 5)
    sent_to_worker(hub, 2)
    os.kill(pid, signal.SIGKILL)
    return running, waiting, pid


def test_killed_worker_under_requeue_loses_neither_run(tmp_path: Path) -> None:
    with one_worker_hub(delivery_orphan_policy="requeue") as hub:
        running, waiting, pid = kill_with_one_waiting(hub, tmp_path)
        assert running.result(timeout=60) == "victim-done"
        assert waiting.result(timeout=60) == 10
        assert hub.dispatcher("w").stats["requeued"] >= 2
    assert len((tmp_path / "victim.attempts").read_text().splitlines()) == 2
    # The waiting run had not started when its worker died: it ran once, on the new one.
    assert (tmp_path / "bystander.runs").read_text().split() != [str(pid)]
    assert len((tmp_path / "bystander.runs").read_text().splitlines()) == 1


def test_killed_worker_under_fail_reports_both_runs(tmp_path: Path) -> None:
    with one_worker_hub(delivery_orphan_policy="fail") as hub:
        running, waiting, _ = kill_with_one_waiting(hub, tmp_path)
        with pytest.raises(DeliveryOrphanedError, match="killed by signal 9"):
            running.result(timeout=60)
        with pytest.raises(DeliveryOrphanedError, match="never started"):
            waiting.result(timeout=60)
        assert hub.run(tasks.add, 1) == 2  # the pool replaced the worker
    assert not (tmp_path / "bystander.runs").exists()


def test_a_frozen_worker_gets_no_run_ahead_after_its_run_is_given_up(tmp_path: Path) -> None:
    """A worker alive but silent (SIGSTOP) loses its run by the heartbeat rule; under
    requeue the next attempt must go to the other worker, not wait in the frozen one."""
    definition = {"executor": "stdio", "executor_config": {"processes": 2},
                  "delivery_heartbeat_seconds": 1.0, "delivery_orphan_policy": "requeue"}
    with Hub(environments={"w": definition}, default_environment="w") as hub:
        # The first worker (the first one offered a run ahead) takes the run to freeze.
        frozen = hub.submit(tasks.die_once, str(tmp_path), "frozen")
        pid = int(wait_for_file(tmp_path / "frozen.pid"))
        other = hub.submit(hold, str(tmp_path), "other")  # keeps the second worker busy
        wait_for_file(tmp_path / "other.started")
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30  # past the heartbeat window: 1 lost, 2 queued
            while hub.dispatcher("w").stats["requeued"] < 1:
                assert time.monotonic() < deadline, "the silent run was never given up"
                time.sleep(0.02)
            (tmp_path / "other.go").touch()
            assert other.result(timeout=30) == "other"
            assert frozen.result(timeout=30) == "frozen-done"
        finally:
            os.kill(pid, signal.SIGKILL)
