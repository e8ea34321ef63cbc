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

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import services
from services import ServiceError, ServiceProcess, children

REDIS_DB = int(os.environ.get("WOVE_TEST_RQ_DB", "9"))
REDIS_URL = os.environ.get("WOVE_TEST_RQ_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")
WOVE_WORKER = "wove_adapters.adapters.rq.Worker"


def redis_client(url: str = REDIS_URL) -> Any:
    import redis

    return redis.Redis.from_url(url)


def require_redis() -> None:
    services.require_redis(REDIS_URL, url_env="WOVE_TEST_RQ_REDIS_URL", suite="rq")


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
        self.service = ServiceProcess(
            f"rq worker {self.name}", command, log=self.log_path,
            env={**os.environ, **(extra_env or {})}, cwd=log_dir, ready=self._registered,
        ).launch()

    @property
    def pid(self) -> int:
        return self.service.pid

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.popen

    def _registered(self) -> bool:
        from rq import Queue, Worker

        with redis_client() as connection:
            workers = Worker.all(queue=Queue(self.queue, connection=connection))
            return self.name in {w.name for w in workers}

    def wait_ready(self, timeout: float = 60.0) -> RqWorker:
        try:
            self.service.wait_ready(timeout)
        except ServiceError as exc:
            self.stop()
            raise AssertionError(str(exc)) from None
        return self

    def horses(self) -> list[int]:
        return children(self.pid)

    def stop(self) -> None:
        if self.service.running():
            horses = self.horses()
            # Two SIGTERMs: RQ's cold shutdown kills the running work-horse, then exits.
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
                time.sleep(0.1)
            self.service.stop()
            # Work-horses leave the worker's process group: by PID.
            for pid in horses:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def cleanup_queue(queue: str, url: str = REDIS_URL) -> None:
    """Remove every job this session put on ``queue``, the queue and its registries (in
    the Redis at ``url``: the benchmarks use their own database)."""
    from rq import Queue
    from rq.job import Job

    with redis_client(url) as connection:
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


