"""``wove-adapters doctor`` against real ``rq worker`` processes.

With no worker on the queue it answers within 5 s with the whole fix hint and sends no
probe (5 s of the command's own, ``timed_cli``: starting the interpreter and importing rq
are the machine's); a probe nobody takes is removed from the queue; a live worker answers the probe,
whose run ``runs`` hides unless asked. Runs in the ``rq`` tox env
(``pytest tests/integration/core/test_cli_doctor_rq.py``); elsewhere it is skipped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("rq", reason="the doctor's RQ checks need the rq extra")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rq"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))

from rq_services import REDIS_URL, RqWorker, cleanup_queue, redis_client, require_redis
from services import scratch_queue
from timed_cli import run_cli

from wove_adapters.cli import PROBE_TASK

ANSWER_WITHIN = 5.0


@pytest.fixture
def queue() -> Iterator[str]:
    yield from scratch_queue("wove-test-doctor-rq", require_redis, cleanup_queue)


def write_config(directory: Path, queue: str) -> Path:
    config = {
        "ledger": ledger_url(directory),
        "environments": {"jobs": {"executor": "rq",
                                  "executor_config": {"redis_url": REDIS_URL, "queue": queue}}},
    }
    path = directory / "wove_config.py"
    path.write_text(f"WOVE_CONFIG = {config!r}\n")
    return path


def ledger_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'runs.db'}"


def doctor(config: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``wove-adapters doctor``; the seconds of the command itself (``timed_cli``)."""
    return run_cli(["doctor", "--config", str(config), "--environment", "jobs", *args],
                   preload=["rq", "redis", "wove_adapters.adapters.rq"],
                   env={**os.environ, "COLUMNS": "40"})


def runs(directory: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "wove_adapters.cli", "runs", "--ledger", ledger_url(directory),
         *args],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"}, timeout=60,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def queued(queue: str) -> int:
    with redis_client() as client:
        return int(client.llen(f"rq:queue:{queue}"))


def assert_answers_no_worker(done: subprocess.CompletedProcess[str], took: float,
                             queue: str) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < ANSWER_WITHIN, f"doctor took {took:.1f}s with no worker on the queue"
    lines = [line for line in done.stdout.splitlines() if line.startswith("  FAIL")]
    assert len(lines) == 1, done.stdout
    # The whole command, on one line, at 40 columns on a pipe.
    assert (f"rq worker {queue} --url {REDIS_URL} -w wove_adapters.adapters.rq.Worker"
            in lines[0])
    assert "probe task round trip: not sent" in done.stdout
    assert done.stderr == ""


def test_no_worker_answers_fast_with_the_whole_hint_and_sends_no_probe(
    queue: str, tmp_path: Path
) -> None:
    done, took = doctor(write_config(tmp_path, queue))
    assert_answers_no_worker(done, took, queue)
    assert queued(queue) == 0
    assert PROBE_TASK not in runs(tmp_path, "--all")


def test_a_live_worker_answers_the_probe_and_the_probe_is_hidden(
    queue: str, tmp_path: Path
) -> None:
    worker = RqWorker(queue, tmp_path).wait_ready()
    try:
        done, _ = doctor(write_config(tmp_path, queue))
    finally:
        worker.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    probe task round trip: " in done.stdout
    assert done.stderr == ""
    assert PROBE_TASK not in runs(tmp_path)
    assert "1 doctor probe run(s) hidden" in runs(tmp_path)
    assert f"{PROBE_TASK}:" in runs(tmp_path, "--all")


def killed_worker(queue: str, directory: Path) -> None:
    worker = RqWorker(queue, directory).wait_ready()
    os.kill(worker.pid, signal.SIGKILL)
    worker.proc.wait(10)
    worker.stop()


def test_a_probe_nobody_takes_is_removed_from_the_queue(queue: str, tmp_path: Path) -> None:
    """A worker killed with SIGKILL stays registered in RQ (for its worker_ttl, 420 s by
    default); the probe then waits in the queue, and must not stay there after doctor."""
    killed_worker(queue, tmp_path)
    done, took = doctor(write_config(tmp_path, queue), "--timeout", "2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert queued(queue) == 0, "the unanswered probe was left on the queue"
    assert took < 2 + ANSWER_WITHIN
    assert done.stderr == ""


def test_a_killed_worker_does_not_count(queue: str, tmp_path: Path) -> None:
    killed_worker(queue, tmp_path)
    done, took = doctor(write_config(tmp_path, queue), "--timeout", "20")
    assert_answers_no_worker(done, took, queue)
