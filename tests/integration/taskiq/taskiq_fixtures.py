"""Helpers for the taskiq tests: start and stop a real ``taskiq worker`` CLI process.

A module of its own (not ``conftest``) so that test modules can import it by a name no
other backend's test directory uses.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REDIS_URL = os.environ.get("WOVE_TEST_TASKIQ_URL", "redis://127.0.0.1:6379/0")
SLOTS = 2


def redis_client() -> Any:
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
        client = redis_client()
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


def start_worker(
    queue: str, log: Path, *, slots: int = SLOTS, broker: str = "list"
) -> TaskiqWorker:
    env = {
        **os.environ,
        "WOVE_TEST_TASKIQ_BROKER": broker,
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
    client = redis_client()
    client.delete(queue, f"wove:taskiq:workers:{queue}")
    for pattern in (f"wove:taskiq:{queue}:*",):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
