"""Helpers for the rq tests: real ``rq worker`` subprocesses on a per-session queue.

Redis must be running on 127.0.0.1:6379 (the tests fail, naming how to start it, when it
is not). Every session uses its own queue name and database ``$WOVE_TEST_RQ_DB``
(default 9), removes only the jobs it created, and stops its workers by PID. RQ's default
worker forks a work-horse per job in its own process group, so stopping a worker also
kills any work-horse it left behind, by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

REDIS_DB = int(os.environ.get("WOVE_TEST_RQ_DB", "9"))
REDIS_URL = os.environ.get("WOVE_TEST_RQ_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")
WOVE_WORKER = "wove_adapters.adapters.rq.Worker"


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def require_redis() -> None:
    import redis

    try:
        client = redis_client()
        client.ping()
        client.close()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {REDIS_URL} ({exc}). Start it with "
            f"`redis-server --daemonize yes --bind 127.0.0.1 --port 6379` (or point "
            f"WOVE_TEST_RQ_REDIS_URL at one) and run the rq tests again."
        )


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (an RQ worker's work-horses)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                found.append(int(entry.name))
    return found


class RqWorker:
    """One ``rq worker`` subprocess in its own session, stopped by PID."""

    def __init__(self, queue: str, log_dir: Path, *, worker_class: str | None = WOVE_WORKER,
                 extra_env: dict[str, str] | None = None) -> None:
        self.queue = queue
        self.name = f"{queue}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.name}.log"
        command = [sys.executable, "-m", "rq.cli", "worker", queue, "--url", REDIS_URL,
                   "--name", self.name, "--logging_level", "WARNING"]
        if worker_class:
            command += ["--worker-class", worker_class]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(log_dir),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> RqWorker:
        from rq import Queue, Worker

        connection = redis_client()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"rq worker exited with {self.proc.returncode}: "
                        f"{self.log_path.read_text()[-2000:]}"
                    )
                names = {w.name for w in Worker.all(queue=Queue(self.queue, connection=connection))}
                if self.name in names:
                    return self
                time.sleep(0.05)
        finally:
            connection.close()
        self.stop()
        raise AssertionError(f"rq worker {self.name} did not register within {timeout}s")

    def horses(self) -> list[int]:
        return _children(self.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            horses = self.horses()
            # Two SIGTERMs: RQ's cold shutdown kills the running work-horse, then exits.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
            for pid in horses:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


def cleanup_queue(queue: str) -> None:
    """Remove every job this session put on ``queue``, the queue and its registries."""
    from rq import Queue
    from rq.job import Job

    connection = redis_client()
    try:
        for key in connection.scan_iter("rq:job:*", count=1000):
            job_id = key.decode().split(":", 2)[2]
            if ":" in job_id:
                continue
            origin = connection.hget(key, "origin")
            if origin is not None and origin.decode() == queue:
                with contextlib.suppress(Exception):
                    Job.fetch(job_id, connection=connection).delete()
                connection.delete(f"rq:results:{job_id}")  # older RQ keeps it past delete()
        with contextlib.suppress(Exception):
            Queue(queue, connection=connection).delete(delete_jobs=True)
        for key in connection.scan_iter(f"rq:*{queue}*", count=1000):
            connection.delete(key)
    finally:
        connection.close()


