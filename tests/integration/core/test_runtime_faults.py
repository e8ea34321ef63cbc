"""Faults of the caller itself, measured with real worker processes.

A caller paused with SIGSTOP (a GC pause, a blocked loop, a laptop lid) must not turn runs
that finished, or kept running, into lost ones: events already on their way are read
before any verdict, and silence is counted only while the caller was running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.testing import tasks

CALLER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    from wove_adapters import Hub

    directory, executor, policy, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


    def work(directory: str, index: int, seconds: float) -> int:
        # One line per execution: O_APPEND of a short line is atomic.
        with open(os.path.join(directory, "executions.log"), "a") as handle:
            handle.write(f"{index} {os.getpid()}\\n")
        time.sleep(seconds)
        return index * index


    config = {"processes": count} if executor == "stdio" else {}
    hub = Hub(
        environments={"w": {
            "executor": executor,
            "executor_config": config,
            "delivery_heartbeat_seconds": 2.0,
            "delivery_orphan_policy": policy,
        }},
        default_environment="w",
        ledger=f"sqlite:///{directory}/runs.db",
    )
    outcomes = {}
    started = time.monotonic()
    with hub:
        # Spread over the pause: most end while the caller is stopped, the longest run on
        # after it (their heartbeats must be heard again).
        futures = {i: hub.submit(work, directory, i, 1.0 + (i % 10) * 1.2) for i in range(count)}
        Path(directory, "submitted").write_text("yes")
        for index, future in futures.items():
            try:
                outcomes[index] = ["ok", future.result(timeout=120)]
            except BaseException as exc:
                outcomes[index] = [type(exc).__name__, str(exc)[:300]]
        stats = dict(hub.dispatcher("w").stats)
    Path(directory, "outcomes.json").write_text(json.dumps(
        {"outcomes": outcomes, "stats": stats, "seconds": time.monotonic() - started}))
    """
)


def _executions(directory: Path) -> Counter[int]:
    log = directory / "executions.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return Counter(int(line.split()[0]) for line in lines if line.strip())


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("executor", ["process", "stdio"])
@pytest.mark.parametrize("policy", ["requeue", "fail"])
def test_a_paused_caller_loses_no_run(tmp_path: Path, executor: str, policy: str) -> None:
    count = 50 if executor == "process" else 24
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = {**os.environ, "WOVE_ADAPTERS_HOME": str(tmp_path / "home")}
    caller = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), executor, policy, str(count)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    began = time.monotonic()
    try:
        # Pause once every run has started: the shortest end during the pause, the
        # longest run across it.
        _wait(lambda: len(_executions(tmp_path)) >= count, 90, "every run to start")
        time.sleep(0.5)
        os.kill(caller.pid, signal.SIGSTOP)
        time.sleep(8.0)
        os.kill(caller.pid, signal.SIGCONT)
        output, _ = caller.communicate(timeout=150)
    finally:
        if caller.poll() is None:
            os.kill(caller.pid, signal.SIGCONT)
            caller.kill()
            caller.wait()
    elapsed = time.monotonic() - began
    text = output.decode(errors="replace")
    report = json.loads((tmp_path / "outcomes.json").read_text())
    outcomes = {int(k): v for k, v in report["outcomes"].items()}
    executions = _executions(tmp_path)
    wrong = {i: o for i, o in outcomes.items() if o != ["ok", i * i]}
    orphaned = [i for i, o in outcomes.items() if o[0] == "DeliveryOrphanedError"]
    twice = {i: n for i, n in executions.items() if n != 1}
    summary = (
        f"{executor}/{policy}: lost={report['stats'].get('lost')} "
        f"requeued={report['stats'].get('requeued')} orphaned={len(orphaned)} "
        f"stalls-seen={report['stats'].get('caller_stalls')} "
        f"executed-not-once={len(twice)} wrong={len(wrong)} in {elapsed:.1f}s"
    )
    print(summary)
    assert len(outcomes) == count, text
    assert report["stats"]["lost"] == 0, summary
    assert orphaned == [], summary
    assert twice == {} and len(executions) == count, summary
    assert wrong == {}, f"{summary}: {dict(list(wrong.items())[:5])}"
    assert elapsed < 90, summary


# ---------------------------------------------------------------- runs that never start


def _mark(directory: str, index: int) -> int:
    with open(os.path.join(directory, "executions.log"), "a") as handle:
        handle.write(f"{index} {os.getpid()}\n")
    return index * index


def _block(directory: str, seconds: float) -> str:
    Path(directory, "blocker.started").write_text(str(os.getpid()))
    time.sleep(seconds)
    return "unblocked"


def _swallowing_python(directory: Path) -> Path:
    """A ``python`` for the ``process`` executor that accepts every first attempt and
    never starts it (like a message prefetched by a worker that was then killed, or lost
    with its broker); later attempts run for real."""
    wrapper = directory / "python-swallows-first-attempts"
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-1.payload*) exec sleep 60;; esac\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _hub(executor: str, executor_config: dict[str, Any], **settings: Any) -> Any:
    from wove_adapters import Hub

    return Hub(
        environments={"w": {"executor": executor, "executor_config": executor_config,
                            **settings}},
        default_environment="w",
        ledger="memory://",
    )


def test_runs_that_never_start_are_requeued_once_and_run_once(tmp_path: Path) -> None:
    count = 6
    config = {"python": str(_swallowing_python(tmp_path))}
    began = time.monotonic()
    with _hub("process", config, delivery_max_pending_seconds=2.0,
              delivery_orphan_policy="requeue") as hub:
        futures = [hub.submit(_mark, str(tmp_path), i) for i in range(count)]
        results = [future.result(timeout=60) for future in futures]
        stats = dict(hub.dispatcher("w").stats)
    elapsed = time.monotonic() - began
    print(f"never-started/requeue: requeued={stats['requeued']} in {elapsed:.1f}s")
    assert results == [i * i for i in range(count)]
    assert _executions(tmp_path) == Counter(range(count))  # each exactly once
    assert stats["requeued"] == count and stats["lost"] == count
    assert elapsed < 40


def test_a_run_that_never_starts_fails_naming_the_cause(tmp_path: Path) -> None:
    from wove_adapters.core.errors import DeliveryOrphanedError

    config = {"python": str(_swallowing_python(tmp_path))}
    with _hub("process", config, delivery_max_pending_seconds=1.5,
              delivery_orphan_policy="fail") as hub:
        future = hub.submit(_mark, str(tmp_path), 1)
        with pytest.raises(DeliveryOrphanedError) as info:
            future.result(timeout=30)
    message = str(info.value)
    assert "not started within 1.5s (delivery_max_pending_seconds)" in message, message
    assert "backend state: running" in message, message
    assert "environment 'w'" in message and "delivery_orphan_policy='fail'" in message
    assert not (tmp_path / "executions.log").exists()


def test_a_queued_run_past_its_pending_deadline_never_runs(tmp_path: Path) -> None:
    from wove_adapters.core.errors import DeliveryOrphanedError

    with _hub("stdio", {"processes": 1}, delivery_max_pending_seconds=1.0,
              delivery_orphan_policy="fail") as hub:
        blocker = hub.submit(_block, str(tmp_path), 3.0)
        queued = hub.submit(_mark, str(tmp_path), 7)
        with pytest.raises(DeliveryOrphanedError, match="not started within 1s") as info:
            queued.result(timeout=30)
        assert "the 'stdio' executor has no status" in str(info.value)
        assert blocker.result(timeout=30) == "unblocked"
    # Taken out of the executor's queue: it never ran, not even after the blocker.
    assert not (tmp_path / "executions.log").exists()


def test_a_run_waiting_to_start_is_reported_at_doubling_ages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="wove_adapters.runtime")
    with _hub("stdio", {"processes": 1, "pending_warning_seconds": 1.0}) as hub:
        blocker = hub.submit(_block, str(tmp_path), 4.6)
        queued = hub.submit(_mark, str(tmp_path), 3)
        assert blocker.result(timeout=30) == "unblocked"
        assert queued.result(timeout=30) == 9
    run_id = queued.run_id
    lines = [r.getMessage() for r in caplog.records if run_id in r.getMessage()]
    assert len(lines) == 3, lines  # at about 1 s, 2 s and 4 s of waiting
    for line in lines:
        assert "environment 'w' (stdio)" in line and "task '_mark'" in line, line
        assert "has not started" in line and "backend state: not reported" in line, line
        assert "delivery_max_pending_seconds" in line, line
    ages = [float(line.split("has not started ")[1].split("s ")[0]) for line in lines]
    assert ages == sorted(ages) and ages[0] >= 1 and ages[-1] >= 4, ages
    # The blocker started at once: it is never reported.
    blocker_id = blocker.run_id
    assert not any(blocker_id in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- caps and cancels


def _step(directory: str, index: int, seconds: float) -> int:
    """Records its span; when cancelled it takes a while to stop (cleanup), as real
    tasks do, and a local thread cannot be stopped at all."""
    start = time.time()
    Path(directory, f"{index}.started").write_text("")
    try:
        time.sleep(seconds)
    except BaseException:  # the stdio worker's TaskCancelled
        time.sleep(0.3)
        raise
    finally:
        with open(os.path.join(directory, "spans.log"), "a") as handle:
            handle.write(f"{index} {start} {time.time()}\n")
    return index


def _most_at_once(directory: Path) -> int:
    edges: list[tuple[float, int]] = []
    for line in (directory / "spans.log").read_text().splitlines():
        _, start, end = line.split()
        edges += [(float(start), 1), (float(end), -1)]
    running = most = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


@pytest.mark.parametrize(
    ("executor", "config"),
    [("stdio", {"processes": 14}), ("local", {"max_workers": 32})],
)
def test_best_effort_cancels_never_break_the_in_flight_cap(
    tmp_path: Path, executor: str, config: dict[str, Any]
) -> None:
    import concurrent.futures

    cap, count = 10, 100
    cancelled = set(range(3, count, 5))  # 20%
    began = time.monotonic()
    with _hub(executor, config, delivery_max_in_flight=cap) as hub:
        futures = [
            hub.submit(_step, str(tmp_path), i, 0.2 + (i % 4) * 0.1) for i in range(count)
        ]
        for index in sorted(cancelled):
            _wait(lambda i=index: (tmp_path / f"{i}.started").exists(), 60, f"run {index}")
            hub.cancel(futures[index])
        outcomes: dict[int, Any] = {}
        for index, future in enumerate(futures):
            try:
                outcomes[index] = future.result(timeout=60)
            except concurrent.futures.CancelledError:
                outcomes[index] = "cancelled"
        stats = dict(hub.dispatcher("w").stats)
    elapsed = time.monotonic() - began
    most = _most_at_once(tmp_path)
    cancels = sum(1 for value in outcomes.values() if value == "cancelled")
    print(f"{executor}: cap {cap}, most at once {most}, cancelled {cancels}, "
          f"released unconfirmed {stats['released_unconfirmed']}, {elapsed:.1f}s")
    assert most <= cap, f"{most} tasks ran at once under delivery_max_in_flight={cap}"
    for index, value in outcomes.items():
        if index not in cancelled:
            assert value == index, (index, value)
    assert cancels >= len(cancelled) // 2  # most cancels landed while their task ran
    assert stats["released_unconfirmed"] == 0  # every stop was seen, none timed out
    assert elapsed < 30


def _stamp(directory: str) -> float:
    now = time.time()
    Path(directory, "next.started").write_text(str(now))
    return now


def test_a_cancel_nobody_confirms_frees_the_slot_after_its_bound(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import concurrent.futures

    caplog.set_level("WARNING", logger="wove_adapters.runtime")
    config = {"processes": 2, "cancel_release_seconds": 1.5}
    with _hub("stdio", config, delivery_max_in_flight=1) as hub:
        stubborn = hub.submit(tasks.ignore_cancel, str(tmp_path), 8.0)
        _wait(lambda: (tmp_path / "stubborn.started").exists(), 30, "the stubborn task")
        cancelled_at = time.time()
        hub.cancel(stubborn)
        with pytest.raises(concurrent.futures.CancelledError):
            stubborn.result(timeout=5)  # the caller is resolved at once
        started = hub.submit(_stamp, str(tmp_path)).result(timeout=30)
        stats = dict(hub.dispatcher("w").stats)
    waited = started - cancelled_at
    print(f"next run started {waited:.2f}s after the unconfirmed cancel")
    assert (tmp_path / "stubborn.ignored").exists()
    # The slot stayed held while the job ran on, and was freed at the bound, not later.
    assert 1.3 <= waited < 5.0, waited
    assert stats["released_unconfirmed"] == 1
    assert any(
        stubborn.run_id in r.getMessage() and "never confirmed that it stopped" in r.getMessage()
        for r in caplog.records
    )
