"""Every delivery policy end to end through real stdio worker processes."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub
from wove_adapters.core.errors import (
    CancelNotAcknowledgedError,
    DeliveryOrphanedError,
    DeliveryTimeoutError,
)
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


def stdio_hub(processes: int = 2, config: dict[str, Any] | None = None, **settings: Any) -> Hub:
    """A Hub on a stdio pool of ``processes`` workers (more executor_config in ``config``)."""
    definition = {"executor": "stdio",
                  "executor_config": {"processes": processes, **(config or {})}, **settings}
    return Hub(environments={"w": definition}, default_environment="w")


def interval(directory: str, tag: str, seconds: float) -> int:
    start = time.time()
    time.sleep(seconds)
    Path(directory, f"{tag}.span").write_text(f"{start} {time.time()} {os.getpid()}")
    return os.getpid()


def test_sigkill_under_requeue_yields_the_result_exactly_once(tmp_path: Path) -> None:
    with stdio_hub(delivery_orphan_policy="requeue") as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "rq")
        pid = int(wait_for_file(tmp_path / "rq.pid"))
        os.kill(pid, signal.SIGKILL)
        assert future.result(timeout=30) == "rq-done"
        attempts = (tmp_path / "rq.attempts").read_text().splitlines()
        assert len(attempts) == 2 and attempts[0] != attempts[1]
        stats = hub.dispatcher("w").stats
        assert stats["requeued"] >= 1


def test_sigkill_under_fail_raises_orphaned(tmp_path: Path) -> None:
    with stdio_hub(delivery_orphan_policy="fail") as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "f")
        os.kill(int(wait_for_file(tmp_path / "f.pid")), signal.SIGKILL)
        with pytest.raises(DeliveryOrphanedError, match="exited with code"):
            future.result(timeout=30)


def test_requeue_is_bounded(tmp_path: Path) -> None:
    def always_dies(directory: str) -> None:
        with open(Path(directory, "tries"), "a") as handle:
            handle.write("x\n")
        os.kill(os.getpid(), signal.SIGKILL)

    with stdio_hub(1, {"max_requeues": 2}, delivery_orphan_policy="requeue") as hub:
        with pytest.raises(DeliveryOrphanedError, match="gave up after 2 requeues"):
            hub.run(always_dies, str(tmp_path))
    assert len((tmp_path / "tries").read_text().splitlines()) == 3


def test_require_ack_against_a_worker_ignoring_cancel(tmp_path: Path) -> None:
    with stdio_hub(1, {"cancel_ack_timeout": 1.0}, delivery_cancel_mode="require_ack") as hub:
        future = hub.submit(tasks.ignore_cancel, str(tmp_path), 4.0)
        wait_for_file(tmp_path / "stubborn.started")
        with pytest.raises(CancelNotAcknowledgedError, match="not acknowledged"):
            hub.cancel(future)
        with pytest.raises(CancelNotAcknowledgedError):
            future.result(timeout=10)
        wait_for_file(tmp_path / "stubborn.ignored")


def test_require_ack_confirmed_stops_the_work(tmp_path: Path) -> None:
    with stdio_hub(delivery_cancel_mode="require_ack") as hub:
        future = hub.submit(tasks.sleepy, str(tmp_path), "ack", 20.0)
        wait_for_file(tmp_path / "ack.started")
        hub.cancel(future)
        with pytest.raises((concurrent.futures.CancelledError,)):
            future.result(timeout=10)
        time.sleep(0.5)
        assert not (tmp_path / "ack.finished").exists()
        # The worker process survived the cancellation and serves the next task.
        assert hub.run(tasks.add, 1) == 2


def test_max_in_flight_is_never_exceeded(tmp_path: Path) -> None:
    with stdio_hub(processes=6, delivery_max_in_flight=3) as hub:
        futures = [hub.submit(interval, str(tmp_path), f"t{i}", 0.4) for i in range(12)]
        for future in futures:
            future.result(timeout=60)
    spans = [tuple(map(float, p.read_text().split()[:2])) for p in tmp_path.glob("*.span")]
    assert len(spans) == 12
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak == 3, f"observed {peak} concurrent runs on the worker side"


def test_heartbeats_let_a_long_task_outlive_a_short_window(tmp_path: Path) -> None:
    with stdio_hub(delivery_heartbeat_seconds=0.5) as hub:
        assert hub.run(tasks.sleepy, str(tmp_path), "hb", 2.5) == "hb"


def test_a_silent_worker_is_lost_after_the_heartbeat_window(tmp_path: Path) -> None:
    with stdio_hub(delivery_heartbeat_seconds=1.0, delivery_orphan_policy="fail") as hub:
        future = hub.submit(tasks.sleepy, str(tmp_path), "frozen", 30.0)
        pid = int(wait_for_file(tmp_path / "frozen.started"))
        os.kill(pid, signal.SIGSTOP)  # alive but silent: no heartbeats, no EOF
        try:
            with pytest.raises(DeliveryOrphanedError, match="no heartbeat"):
                future.result(timeout=20)
        finally:
            os.kill(pid, signal.SIGKILL)


def test_delivery_timeout_cancels_the_run(tmp_path: Path) -> None:
    with stdio_hub(delivery_timeout=3.0) as hub:
        start = time.monotonic()
        with pytest.raises(DeliveryTimeoutError):
            hub.run(tasks.sleepy, str(tmp_path), "slow", 30.0)
        assert time.monotonic() - start < 20
        time.sleep(0.5)
        assert (tmp_path / "slow.started").exists()
        assert not (tmp_path / "slow.finished").exists()


def test_idempotency_in_process(tmp_path: Path) -> None:
    key = f"k-{uuid.uuid4().hex}"
    with stdio_hub(delivery_idempotency_key=key) as hub:
        futures = [hub.submit(tasks.record, str(tmp_path), "i", 5) for _ in range(4)]
        assert [f.result(timeout=30) for f in futures] == [10] * 4
    assert len((tmp_path / "i.runs").read_text().splitlines()) == 1


def test_idempotency_key_callable(tmp_path: Path) -> None:
    with stdio_hub(delivery_idempotency_key=lambda a: f"cb-{a['value']}-{tmp_path}") as hub:
        out = [hub.submit(tasks.record, str(tmp_path), "c", v) for v in (1, 2, 1)]
        assert [f.result(timeout=30) for f in out] == [2, 4, 2]
    assert len((tmp_path / "c.runs").read_text().splitlines()) == 2


def flaky(directory: str) -> str:
    path = Path(directory, "flaky")
    tries = int(path.read_text()) if path.exists() else 0
    path.write_text(str(tries + 1))
    if tries < 2:
        raise RuntimeError(f"try {tries}")
    return "ok"


def test_retries_and_timeout(tmp_path: Path) -> None:
    with stdio_hub(retries=2) as hub:
        assert hub.run(flaky, str(tmp_path)) == "ok"
    with stdio_hub(timeout=0.5) as hub, pytest.raises(TimeoutError):
        hub.run(tasks.sleepy, str(tmp_path), "t", 5.0)


def test_map_settings(tmp_path: Path) -> None:
    with stdio_hub(processes=4) as hub:
        results = hub.map(tasks.fail, ["a", "b"], error_mode="return")
        assert all(isinstance(r, tasks.ConformanceError) for r in results)
        with pytest.raises(RuntimeError, match="exceeds max_pending=2"):
            hub.map(tasks.add, range(3), max_pending=2)
        start = time.monotonic()
        assert hub.map(tasks.add, range(3), limit_per_minute=120) == [1, 2, 3]
        assert time.monotonic() - start >= 0.9  # 0.5 s spacing between starts
        names = [f"w{i}" for i in range(6)]
        hub.map(lambda tag: interval(str(tmp_path), tag, 0.3), names, workers=2)
    spans = [tuple(map(float, p.read_text().split()[:2])) for p in tmp_path.glob("w*.span")]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2


def test_executor_facade(tmp_path: Path) -> None:
    with stdio_hub() as hub:
        with hub.executor("w") as pool:
            assert list(pool.map(tasks.add, [1, 2, 3])) == [2, 3, 4]
            future = pool.submit(tasks.add, 10)
            assert future.result() == 11
            assert future.run_id.startswith("add:")  # type: ignore[attr-defined]


async def test_async_api(tmp_path: Path) -> None:
    async with stdio_hub() as hub:
        assert await hub.arun(tasks.add, 2) == 3
        future = hub.asubmit(tasks.add, 3)
        assert future.run_id.startswith("add:")  # type: ignore[attr-defined]
        assert await future == 4
        assert await hub.amap(tasks.add, [1, 2]) == [2, 3]
