"""``wove-adapters result``: one answer per terminal state, at once; waits only in flight.

Real runs on real stdio workers (their outcomes kept through an idempotency key), plus
ledger rows that hold only a state (what the runtime writes for a run it does not keep
the outcome of): every one must answer at once, with its own word and exit code.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from wove_adapters import Hub
from wove_adapters.cli import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_IN_FLIGHT,
    EXIT_LOST,
    EXIT_NOT_FOUND,
    EXIT_SUCCEEDED,
    EXIT_TIMED_OUT,
    main,
)
from wove_adapters.core.errors import DeliveryTimeoutError
from wove_adapters.core.ledger import open_ledger
from wove_adapters.core.ledger.base import (
    CANCELLED,
    FAILED,
    LOST,
    RUNNING,
    SUBMITTED,
    SUCCEEDED,
    RunRecord,
)

# What "at once" means here: a CLI call on a loaded 2-core machine, no waiting.
AT_ONCE = 3.0


def boom(x: int) -> int:
    raise ValueError(f"bad input {x}")


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """One real run per outcome the runtime records with its outcome blob."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cli-result') / 'runs.db'}"
    ids: dict[str, str] = {}
    with Hub(environments={"w": {"executor": "stdio"}}, default_environment="w",
             ledger=url) as hub:
        def keyed(name: str, **extra: object) -> dict[str, object]:
            return {"delivery_idempotency_key": f"cli-result-{name}-{time.time_ns()}", **extra}

        future = hub.submit(abs, -3, task_options=keyed("ok"))
        assert future.result(timeout=60) == 3
        ids["succeeded"] = future.run_id
        future = hub.submit(boom, 7, task_options=keyed("boom"))
        with pytest.raises(ValueError):
            future.result(timeout=60)
        ids["failed"] = future.run_id
        future = hub.submit(slow, 30, task_options=keyed("slow", delivery_timeout=0.5))
        with pytest.raises(DeliveryTimeoutError):
            future.result(timeout=60)
        ids["timed_out"] = future.run_id
        future = hub.submit(slow, 30, task_options=keyed("cancel"))
        time.sleep(0.5)
        hub.cancel(future)
        with pytest.raises(BaseException):  # noqa: B017 (CancelledError is a BaseException)
            future.result(timeout=60)
        ids["cancelled"] = future.run_id
    ledger = open_ledger(url)

    async def settled() -> bool:
        records = [await ledger.get(run_id) for run_id in ids.values()]
        return all(r is not None and r.outcome is not None for r in records)

    deadline = time.monotonic() + 10
    while not asyncio.run(settled()):
        assert time.monotonic() < deadline, "the runs' outcomes never reached the ledger"
        time.sleep(0.05)
    yield url, ids


def invoke(*args: str) -> tuple[Result, float]:
    started = time.monotonic()
    result = CliRunner().invoke(main, ["result", *args])
    return result, time.monotonic() - started


def add_row(url: str, run_id: str, state: str, *, outcome: bytes | None = None) -> None:
    """A ledger row as the runtime leaves it when it records only the state."""
    ledger = open_ledger(url)

    async def write() -> None:
        await ledger.claim(RunRecord(run_id=run_id, environment="w", task_id="t",
                                     adapter="stdio"))
        if state in (SUCCEEDED, FAILED, CANCELLED, LOST):
            assert await ledger.set_outcome(run_id, state, outcome)
        elif state != SUBMITTED:
            await ledger.update(run_id, state=state)

    asyncio.run(write())


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'runs.db'}"


# ------------------------------------------------------------------ real outcomes


def test_succeeded_prints_the_value_at_once(real_runs: tuple[str, dict[str, str]]) -> None:
    url, ids = real_runs
    result, took = invoke(ids["succeeded"], "--ledger", url, "--wait", "30")
    assert result.exit_code == EXIT_SUCCEEDED, result.output
    assert result.stdout.strip() == "3"
    assert took < AT_ONCE


def test_failed_says_type_message_and_the_remote_traceback(
    real_runs: tuple[str, dict[str, str]],
) -> None:
    url, ids = real_runs
    result, took = invoke(ids["failed"], "--ledger", url, "--wait", "30")
    assert result.exit_code == EXIT_FAILED, result.output
    assert f"run {ids['failed']} failed: ValueError: bad input 7" in result.stderr
    assert "remote traceback" in result.stderr
    # The task's own frame, as the worker formatted it.
    assert "in boom" in result.stderr
    assert result.stdout == ""
    assert took < AT_ONCE


@pytest.mark.parametrize(("ended", "code", "says"), [
    # A timeout is its own answer, with the bound that was exceeded.
    ("timed_out", EXIT_TIMED_OUT, ["timed out: ", "0.5s"]),
    # A cancellation gives the reason.
    ("cancelled", EXIT_CANCELLED, ["cancelled: cancelled by the caller"]),
])
def test_timed_out_and_cancelled_say_how_they_ended(
    real_runs: tuple[str, dict[str, str]], ended: str, code: int, says: list[str]
) -> None:
    url, ids = real_runs
    result, took = invoke(ids[ended], "--ledger", url, "--wait", "30")
    assert result.exit_code == code, result.output
    assert f"run {ids[ended]} {says[0]}" in result.stderr
    for words in says[1:]:
        assert words in result.stderr
    assert took < AT_ONCE


# ------------------------------------------------------------------ state-only rows


@pytest.mark.parametrize(
    ("state", "code", "words"),
    [
        (FAILED, EXIT_FAILED, "failed; the ledger recorded the state without the error"),
        (LOST, EXIT_LOST, "lost: the ledger records no reason"),
        (CANCELLED, EXIT_CANCELLED, "cancelled: no reason recorded"),
        (SUCCEEDED, EXIT_SUCCEEDED, "succeeded; its value was not kept"),
    ],
)
def test_a_terminal_row_without_outcome_answers_at_once(
    url: str, state: str, code: int, words: str
) -> None:
    add_row(url, f"t:{state}-row", state)
    result, took = invoke(f"t:{state}-row", "--ledger", url, "--wait", "60")
    assert result.exit_code == code, result.output
    assert words in result.stderr
    assert result.stdout == ""
    assert took < AT_ONCE


def test_in_flight_waits_only_up_to_wait(url: str) -> None:
    add_row(url, "t:queued", SUBMITTED)
    add_row(url, "t:running", RUNNING)
    result, took = invoke("t:queued", "--ledger", url)
    assert result.exit_code == EXIT_IN_FLIGHT, result.output
    assert "is still submitted" in result.stderr and "--wait" in result.stderr
    assert took < AT_ONCE
    result, took = invoke("t:running", "--ledger", url, "--wait", "1")
    assert result.exit_code == EXIT_IN_FLIGHT, result.output
    assert 1.0 <= took < 1.0 + AT_ONCE


def test_waiting_answers_as_soon_as_the_run_ends(url: str) -> None:
    """A run that ends while `result --wait` waits is answered then, not at the deadline;
    the CLI runs in its own process, as a user would run it."""
    add_row(url, "t:ends-later", RUNNING)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "wove_adapters.cli", "result", "ends-later", "--ledger", url,
         "--wait", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "40"},
    )
    time.sleep(1.0)
    assert proc.poll() is None, proc.communicate()
    ledger = open_ledger(url)
    assert asyncio.run(ledger.set_outcome("t:ends-later", CANCELLED, None))
    out, err = proc.communicate(timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == EXIT_CANCELLED, err
    assert err.startswith("run t:ends-later cancelled: ")
    assert out == ""
    assert took < 1.0 + AT_ONCE + 2  # interpreter start included


# ------------------------------------------------------------------ prefixes


def test_a_unique_prefix_is_enough(url: str) -> None:
    add_row(url, "report:4f2a9c0011", SUCCEEDED)
    add_row(url, "report:4f2b000022", FAILED)
    add_row(url, "merge:77aa", LOST)
    for prefix in ("report:4f2a", "4f2a", "merge", "77"):
        result, _ = invoke(prefix, "--ledger", url)
        expected = {"report:4f2a": EXIT_SUCCEEDED, "4f2a": EXIT_SUCCEEDED, "merge": EXIT_LOST,
                    "77": EXIT_LOST}[prefix]
        assert result.exit_code == expected, (prefix, result.output)


def test_an_ambiguous_prefix_lists_the_candidates(url: str) -> None:
    add_row(url, "report:4f2a9c0011", SUCCEEDED)
    add_row(url, "report:4f2b000022", FAILED)
    result, took = invoke("report:4f", "--ledger", url)
    assert result.exit_code == EXIT_NOT_FOUND, result.output
    assert "'report:4f' is ambiguous" in result.stderr
    assert "report:4f2a9c0011  (succeeded)" in result.stderr
    assert "report:4f2b000022  (failed)" in result.stderr
    assert took < AT_ONCE


def test_an_unknown_run_says_where_it_looked(url: str) -> None:
    add_row(url, "report:1", SUCCEEDED)
    result, _ = invoke("nothing-like-it", "--ledger", url, "--wait", "30")
    assert result.exit_code == EXIT_NOT_FOUND, result.output
    assert "no run 'nothing-like-it' in sqlite:///" in result.stderr
    assert "wove-adapters runs" in result.stderr
