"""``wove-adapters doctor`` against real Celery workers on Redis.

With no worker on the queue it answers within 5 s with the whole fix hint and sends no
probe (nothing is left on the broker): 5 s of the doctor's own, from its start to its
answer (``timed_cli``: starting the interpreter and importing celery are the machine's,
and on 2 cores shared with a parallel test run they took seconds); a worker killed
with SIGKILL no longer counts; with a live worker the probe runs, and its run is hidden
from ``runs`` unless asked.
Runs in the ``celery`` tox env (``pytest tests/integration/core/test_cli_doctor_celery.py``);
elsewhere it is skipped for want of celery.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("celery", reason="the doctor's Celery checks need the celery extra")

CELERY_TESTS = Path(__file__).resolve().parents[1] / "celery"
sys.path.insert(0, str(CELERY_TESTS))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))

from celery_services import REDIS_URL, CeleryService, running  # noqa: E402
from timed_cli import run_cli  # noqa: E402

from wove_adapters.cli import PROBE_TASK  # noqa: E402

# The promise: an answer within 5 s when nobody consumes the queue.
ANSWER_WITHIN = 5.0


def write_config(path: Path, service: CeleryService) -> Path:
    """The environment, and a ledger of this test's own (the signing keys stay in the
    session's WOVE_ADAPTERS_HOME, which the worker reads too)."""
    config = {
        "ledger": ledger_url(path.parent),
        "environments": {"jobs": {"executor": "celery",
                                  "executor_config": service.executor_config}},
    }
    path.write_text(f"WOVE_CONFIG = {config!r}\n")
    return path


def ledger_url(directory: Path) -> str:
    return f"sqlite:///{directory / 'runs.db'}"


def doctor(config: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``wove-adapters doctor``; the seconds of the command itself (``timed_cli``)."""
    return run_cli(["doctor", "--config", str(config), "--environment", "jobs",
                    "--timeout", "20", *args],
                   preload=["celery", "kombu.transport.redis", "wove_adapters.adapters.celery"],
                   env={**os.environ, "COLUMNS": "40"})


def runs(directory: Path, *args: str) -> str:
    env = {**os.environ, "COLUMNS": "40"}
    done = subprocess.run([sys.executable, "-m", "wove_adapters.cli", "runs", "--ledger",
                           ledger_url(directory), *args],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    return done.stdout


def queue_length(service: CeleryService) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.llen(f"{service.prefix}{service.queue}"))
    finally:
        client.close()


@pytest.fixture
def idle_queue(tmp_path: Path) -> Iterator[CeleryService]:
    """A queue nobody consumes (no worker is started)."""
    service = CeleryService("redis", log_dir=tmp_path)
    yield service
    service.cleanup()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryService]:
    yield from running("redis", tmp_path_factory.mktemp("doctor-celery"))


def fix_hint_line(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if "worker on queue" in line]
    assert len(lines) == 1, stdout
    return lines[0]


def assert_answers_no_worker(done: subprocess.CompletedProcess[str], took: float,
                             service: CeleryService) -> None:
    assert done.returncode == 1, done.stdout + done.stderr
    assert took < ANSWER_WITHIN, f"doctor took {took:.1f}s with no worker on the queue"
    line = fix_hint_line(done.stdout)
    # The whole hint, on one line, at 40 columns on a pipe: nothing cut.
    assert "FAIL" in line
    assert f"no worker consumes queue '{service.queue}': start one with " in line
    assert f"`celery -A yourapp worker -Q {service.queue}`" in line
    assert "register(app)`" in line
    assert "probe task round trip: not sent" in done.stdout
    assert done.stderr == ""


def test_no_worker_answers_fast_with_the_whole_hint_and_sends_no_probe(
    idle_queue: CeleryService, tmp_path: Path
) -> None:
    done, took = doctor(write_config(tmp_path / "wove_config.py", idle_queue))
    assert_answers_no_worker(done, took, idle_queue)
    assert queue_length(idle_queue) == 0, "a probe was left on the broker"
    assert PROBE_TASK not in runs(tmp_path, "--all")


def test_a_killed_worker_does_not_count(tmp_path: Path) -> None:
    service = CeleryService("redis", log_dir=tmp_path)
    try:
        service.start()
        config = write_config(tmp_path / "wove_config.py", service)
        done, _ = doctor(config)
        assert done.returncode == 0, done.stdout + done.stderr
        assert service.process is not None
        os.killpg(service.process.pid, signal.SIGKILL)
        service.process.wait(10)
        done, took = doctor(config)
        assert_answers_no_worker(done, took, service)
        assert queue_length(service) == 0
    finally:
        service.stop()
        service.cleanup()


def test_a_live_worker_answers_the_probe_and_the_probe_is_hidden(
    live: CeleryService, tmp_path: Path
) -> None:
    done, _ = doctor(write_config(tmp_path / "wove_config.py", live))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok    probe task round trip: " in done.stdout
    assert f"{live.node} on '{live.queue}'" in done.stdout
    assert done.stderr == ""
    assert PROBE_TASK not in runs(tmp_path)
    assert "1 doctor probe run(s) hidden" in runs(tmp_path)
    assert f"{PROBE_TASK}:" in runs(tmp_path, "--all")
