"""Task controls (docs/task-controls.md) against real stdio workers and the shared ledgers.

The limit is counted on the worker side: every run records when it executed, and the
test computes the most that overlapped. Callers are separate processes with their own Hub,
as in production, sharing only the ledger.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import controls_callers as cc
import shared_servers

from wove_adapters import Hub
from wove_adapters.core.errors import ArgumentsConflictError

STDIO = {"executor": "stdio", "executor_config": {"processes": 4}}


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def shared_ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    name = f"wove_controls_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
    with shared_servers.ledger(request.param, name, tmp_path, suite="task controls") as url:
        yield url


def test_one_run_of_a_task_at_a_time_across_three_callers(
    shared_ledger: str, tmp_path: Path
) -> None:
    tasks = {"controlled": {"concurrency_control": "task"}}
    runs, elapsed = cc.three_callers(shared_ledger, STDIO, tasks, tmp_path)
    assert cc.peak(runs, per_key=False) == 1
    busy = sum(ended - begun for _, begun, ended in runs)
    print(f"\n{shared_ledger.split(':')[0]}: 300 runs one at a time in {elapsed:.1f} s "
          f"({busy:.1f} s of work; {(elapsed - busy) / 300 * 1000:.0f} ms per hand-over)")


def test_one_run_per_key_across_three_callers(tmp_path: Path) -> None:
    tasks = {"controlled": {"concurrency_control": "keys", "key_arguments": ["key"]}}
    runs, _ = cc.three_callers(f"sqlite:///{tmp_path}/runs.db", STDIO, tasks, tmp_path,
                               seconds=0.01)
    assert cc.peak(runs, per_key=True) == 1  # never two runs of one key at once
    print(f"\nthree keys: at most {cc.peak(runs, per_key=False)} runs at once overall")


def test_a_slot_held_by_a_killed_caller_frees_within_its_lease(tmp_path: Path) -> None:
    lease = 2.0
    ledger = f"sqlite:///{tmp_path}/runs.db"
    tasks = {"controlled": {"concurrency_control": "task", "concurrency_lease_seconds": lease}}
    holder = cc.start_callers(1, ledger=ledger, environment=STDIO, tasks=tasks, count=1,
                              record_dir=tmp_path, seconds=60)[0]
    deadline = time.monotonic() + 60
    while not cc.starts(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cc.starts(tmp_path), "the first caller's run never started"
    waiter = cc.start_callers(1, ledger=ledger, environment=STDIO, tasks=tasks, count=1,
                              record_dir=tmp_path, seconds=0)[0]
    time.sleep(1.0)
    assert len(cc.starts(tmp_path)) == 1  # the slot is held: the second run waits
    killed_at = time.time()
    cc.kill(holder)
    result = cc.finish(waiter, timeout=60)
    assert result["values"] == ["c0-0"]
    second_start = max(cc.starts(tmp_path))
    freed_after = second_start - killed_at
    print(f"\nslot of a killed caller taken again after {freed_after:.2f} s (lease {lease} s)")
    assert 0 < freed_after < lease + 3.0


# ---------------------------------------------------------------- within one caller


def _hub(tmp_path: Path, **task: Any) -> Hub:
    return Hub(environments={"e": STDIO}, default_environment="e",
               ledger=f"sqlite:///{tmp_path}/runs.db", tasks={"controlled": task})


def _call(hub: Hub, key: str, tag: str, tmp_path: Path, seconds: float = 0.0) -> Any:
    return hub.submit(cc.task(), key, tag, str(tmp_path), seconds,
                      task_options={"task_name": "controlled"})


def test_cache_hits_do_not_run_and_disable_cache_args_leaves_the_key(tmp_path: Path) -> None:
    with _hub(tmp_path, cache_results=True, disable_cache_args=["call"]) as hub:
        first = _call(hub, "k", "first", tmp_path).result(timeout=60)
        again = _call(hub, "k", "second", tmp_path).result(timeout=60)  # "call" is ignored
        other = _call(hub, "other", "third", tmp_path).result(timeout=60)
    assert (first, again, other) == ("first", "first", "third")
    assert len(cc.recorded(tmp_path)) == 2  # the hit ran nothing


def test_without_disable_cache_args_every_argument_is_in_the_key(tmp_path: Path) -> None:
    with _hub(tmp_path, cache_results=True) as hub:
        assert _call(hub, "k", "first", tmp_path).result(timeout=60) == "first"
        assert _call(hub, "k", "second", tmp_path).result(timeout=60) == "second"
        assert _call(hub, "k", "second", tmp_path).result(timeout=60) == "second"
    assert len(cc.recorded(tmp_path)) == 2


def test_cache_entries_expire(tmp_path: Path) -> None:
    with _hub(tmp_path, cache_results=True, cache_ttl_seconds=1.0) as hub:
        assert _call(hub, "k", "first", tmp_path).result(timeout=60) == "first"
        time.sleep(1.1)  # past the entry's window
        assert _call(hub, "k", "first", tmp_path).result(timeout=60) == "first"
    assert len(cc.recorded(tmp_path)) == 2


def test_on_diff_non_key_args_raise_names_both_argument_sets(tmp_path: Path) -> None:
    with _hub(tmp_path, cache_results=True, disable_cache_args=["call"],
              on_diff_non_key_args_raise=True) as hub:
        assert _call(hub, "k", "first", tmp_path).result(timeout=60) == "first"
        with pytest.raises(ArgumentsConflictError) as raised:
            _call(hub, "k", "second", tmp_path).result(timeout=60)
        assert _call(hub, "k", "first", tmp_path).result(timeout=60) == "first"  # same set
    assert "call='second'" in raised.value.this and "call='first'" in raised.value.other
    assert len(cc.recorded(tmp_path)) == 1


def test_registration_concurrency_attaches_to_the_pending_run(tmp_path: Path) -> None:
    with _hub(tmp_path, registration_concurrency="arguments") as hub:
        futures = [_call(hub, "k", "same", tmp_path, 1.0) for _ in range(3)]
        assert [f.result(timeout=60) for f in futures] == ["same"] * 3
        assert _call(hub, "k", "same", tmp_path).result(timeout=60) == "same"  # after: runs
    assert len(cc.recorded(tmp_path)) == 2


def test_reroute_attaches_to_the_run_holding_the_slot(tmp_path: Path) -> None:
    with _hub(tmp_path, concurrency_control="task", reroute_on_concurrency_control=True) as hub:
        holder = _call(hub, "k", "holder", tmp_path, 1.5)
        deadline = time.monotonic() + 30
        while not cc.starts(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        rerouted = _call(hub, "other", "rerouted", tmp_path)
        assert rerouted.result(timeout=60) == "holder"
        assert holder.result(timeout=60) == "holder"
    assert len(cc.recorded(tmp_path)) == 1


def test_keys_mode_without_key_arguments_is_a_clear_error(tmp_path: Path) -> None:
    with _hub(tmp_path, concurrency_control="keys") as hub, pytest.raises(
        ValueError, match="key_arguments"
    ):
        _call(hub, "k", "x", tmp_path).result(timeout=60)


def test_controls_hold_inside_a_wove_weave(tmp_path: Path) -> None:
    wove = pytest.importorskip("wove", reason="the wove extra is part of `dev`; install it")
    from wove_adapters.integration.wove import executor

    record = cc.task()
    remote = executor("w", config={
        "environments": {"w": STDIO}, "ledger": f"sqlite:///{tmp_path}/runs.db",
        "tasks": {"controlled": {"concurrency_control": "task"}},  # wove's task name
    })
    wove.config(environments={"remote": {"executor": remote}})
    try:
        with wove.weave() as w:

            @w.do
            def items() -> list[int]:
                return list(range(12))

            @w.do("items", environment="remote")
            def controlled(item: int) -> Any:
                return record(f"k{item % 3}", item, str(tmp_path), 0.05)

        assert w.result.controlled == list(range(12))
    finally:
        wove.config(environments={"default": {"executor": "local"}}, default_environment="default")
    runs = cc.recorded(tmp_path)
    assert len(runs) == 12
    assert cc.peak(runs, per_key=False) == 1  # wove sent all twelve at once


def test_a_run_cancelled_while_waiting_for_its_slot_leaves_no_slot_behind(
    tmp_path: Path,
) -> None:
    with _hub(tmp_path, concurrency_control="task", concurrency_lease_seconds=60) as hub:
        holder = _call(hub, "k", "holder", tmp_path, 1.0)
        waiting = [_call(hub, "k", f"w{i}", tmp_path) for i in range(3)]
        time.sleep(0.3)
        for future in waiting:
            hub.cancel(future)
        assert holder.result(timeout=60) == "holder"
        started = time.monotonic()
        # With a 60 s lease renewed by this process, a leaked slot would hold this forever.
        assert _call(hub, "k", "after", tmp_path).result(timeout=30) == "after"
        assert time.monotonic() - started < 10
    assert len(cc.recorded(tmp_path)) == 2  # the holder and the one after; none cancelled ran
