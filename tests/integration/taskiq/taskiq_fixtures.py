"""Helpers for the taskiq tests: start and stop a real ``taskiq worker`` CLI process.

A module of its own (not ``conftest``) so that test modules can import it by a name no
other backend's test directory uses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
import services  # noqa: E402
from services import ServiceError, ServiceProcess  # noqa: E402

REDIS_URL = os.environ.get("WOVE_TEST_TASKIQ_URL", "redis://127.0.0.1:6379/0")
SLOTS = 2


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)


def require_redis() -> None:
    services.require_redis(REDIS_URL, url_env="WOVE_TEST_TASKIQ_URL", suite="taskiq")


@dataclass
class TaskiqWorker:
    queue: str
    url: str
    service: ServiceProcess
    log: Path

    @property
    def config(self) -> dict[str, Any]:
        return {"url": self.url, "queue": self.queue}

    def worker_pids(self) -> list[int]:
        """PIDs of the taskiq worker processes (children of the CLI's manager)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.service.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]

    def announced(self) -> bool:
        """A worker process announced itself and its payload processes are warm."""
        with redis_client() as client:
            seen = client.zrangebyscore(f"wove:taskiq:workers:{self.queue}", time.time() - 15,
                                        "+inf")
        pids = set(map(str, self.worker_pids()))
        return any(m.decode().rsplit(":", 1)[-1] in pids for m in seen)

    def wait_ready(self, timeout: float = 90.0) -> None:
        try:
            self.service.wait_ready(timeout)
        except ServiceError as exc:
            raise AssertionError(str(exc)) from None


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
    service = ServiceProcess(
        f"taskiq worker on {queue}",
        [sys.executable, "-m", "taskiq", "worker", "taskiq_worker_app:broker",
         "--workers", "1", "--max-async-tasks", str(slots), "--log-level", "WARNING",
         "--shutdown-timeout", "5", "--wait-tasks-timeout", "5"],
        log=log, env=env, cwd=HERE, grace=20, kill_group_after=False,
    ).launch()
    worker = TaskiqWorker(queue=queue, url=REDIS_URL, service=service, log=log)
    service.ready = worker.announced
    try:
        worker.wait_ready()
    except BaseException:
        stop_worker(worker)
        raise
    return worker


def stop_worker(worker: TaskiqWorker) -> None:
    """SIGTERM by PID; SIGKILL of its own group (only what it started) after 20 s."""
    worker.service.stop()
    cleanup_keys(worker.queue)


def cleanup_keys(queue: str) -> None:
    client = redis_client()
    client.delete(queue, f"wove:taskiq:workers:{queue}")
    for pattern in (f"wove:taskiq:{queue}:*",):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i : i + 500])
