"""Fixtures: a real ``taskiq worker`` process on a queue of its own, for the session.

Redis must be running on 127.0.0.1:6379; if it is not, every test here fails and says how
to start it. The worker is started with the system's own CLI
(``python -m taskiq worker taskiq_worker_app:broker``), stopped by its PID, and its queue
and keys are deleted afterwards (never FLUSHDB: Redis is shared).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("WOVE_TEST_TASKIQ_URL", "redis://127.0.0.1:6379/0")
SLOTS = 2


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)


@dataclass
class TaskiqWorker:
    queue: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def config(self) -> dict[str, Any]:
        return {"url": self.url, "queue": self.queue}

    def worker_pids(self) -> list[int]:
        """PIDs of the taskiq worker processes (children of the CLI's manager)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until a worker process announced itself and its payload processes are warm."""
        client = _redis()
        deadline = time.monotonic() + timeout
        key = f"wove:taskiq:workers:{self.queue}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"taskiq worker exited: {self.log.read_text()[-3000:]}")
            seen = client.zrangebyscore(key, time.time() - 15, "+inf")
            pids = self.worker_pids()
            if any(m.decode().rsplit(":", 1)[-1] in map(str, pids) for m in seen):
                return
            time.sleep(0.05)
        tail = self.log.read_text()[-3000:]
        raise AssertionError(f"taskiq worker not ready in {timeout}s: {tail}")


def start_worker(queue: str, log: Path, *, slots: int = SLOTS) -> TaskiqWorker:
    env = {
        **os.environ,
        "WOVE_TEST_TASKIQ_URL": REDIS_URL,
        "WOVE_TEST_TASKIQ_QUEUE": queue,
        "WOVE_TEST_TASKIQ_PROCESSES": str(slots),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    handle = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskiq", "worker", "taskiq_worker_app:broker",
         "--workers", "1", "--max-async-tasks", str(slots), "--log-level", "WARNING",
         "--shutdown-timeout", "5", "--wait-tasks-timeout", "5"],
        env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, cwd=str(HERE),
    )
    worker = TaskiqWorker(queue=queue, url=REDIS_URL, proc=proc, log=log)
    try:
        worker.wait_ready()
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: TaskiqWorker) -> None:
    if worker.proc.poll() is None:
        worker.proc.send_signal(signal.SIGTERM)
        try:
            worker.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.proc.pid, signal.SIGKILL)  # its own session: only what we started
            worker.proc.wait(10)
    cleanup_keys(worker.queue)


def cleanup_keys(queue: str) -> None:
    client = _redis()
    client.delete(queue, f"wove:taskiq:workers:{queue}")
    for pattern in (f"wove:taskiq:{queue}:*",):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])


@pytest.fixture(scope="session")
def redis_available() -> None:
    try:
        _redis().ping()
    except Exception as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}). The taskiq tests need it: start "
            "it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379` (or point "
            "WOVE_TEST_TASKIQ_URL at one).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def taskiq_worker(
    redis_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TaskiqWorker]:
    queue = f"wove-test-taskiq-{uuid.uuid4().hex[:8]}"
    log = tmp_path_factory.mktemp("taskiq") / "worker.log"
    worker = start_worker(queue, log)
    yield worker
    stop_worker(worker)
