"""Real ``arq`` CLI workers for the arq tests, and per-session Redis hygiene.

Redis must be running on 127.0.0.1:6379 (the tests fail, naming how to start it, when it
is not). A session uses database ``$WOVE_TEST_ARQ_DB`` (default 10), its own queue names
and job-id prefix ``wove-test-arq-<uuid8>-``, deletes only the keys carrying that prefix,
and stops its workers by PID.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
import services  # noqa: E402
from services import ServiceError, ServiceProcess, log_tail  # noqa: E402

REDIS_DB = int(os.environ.get("WOVE_TEST_ARQ_DB", "10"))
REDIS_URL = os.environ.get("WOVE_TEST_ARQ_REDIS_URL", f"redis://127.0.0.1:6379/{REDIS_DB}")
SESSION = f"wove-test-arq-{uuid.uuid4().hex[:8]}"
PREFIX = f"{SESSION}-"  # every job id and queue name of this session starts with it


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def require_redis() -> None:
    services.require_redis(REDIS_URL, url_env="WOVE_TEST_ARQ_REDIS_URL", suite="arq")


def arq_command() -> list[str]:
    """The system's own CLI: the ``arq`` script next to this Python."""
    script = Path(sys.executable).parent / "arq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "arq"]


class ArqWorker:
    """One ``arq <module>.<settings>`` process in its own session (``ServiceProcess``):
    ready once its health-check key appears, stopped by PID."""

    def __init__(
        self,
        queue: str,
        log_dir: Path,
        *,
        settings: str = "WorkerSettings",
        env: dict[str, str] | None = None,
        module: str = "arq_worker_settings",
        cwd: Path = HERE,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.module = module
        self.cwd = cwd
        self.env = {
            **os.environ,
            "WOVE_TEST_ARQ_REDIS_URL": REDIS_URL,
            "WOVE_TEST_ARQ_QUEUE": queue,
            **(env or {}),
        }
        self.log_dir = log_dir
        self.service: ServiceProcess | None = None
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.service is None else self.service.proc

    @property
    def pid(self) -> int:
        assert self.service is not None
        return self.service.pid

    @property
    def health_key(self) -> str:
        return f"{self.queue}:health-check"

    def _log_path(self) -> Path:
        return self.log_dir / f"{self.queue}-{self.starts}.log"

    def start(self, timeout: float = 60.0) -> ArqWorker:
        client = redis_client()
        client.delete(self.health_key)  # a killed worker's key would look alive
        self.starts += 1
        self.service = ServiceProcess(
            f"arq worker on {self.queue}", [*arq_command(), f"{self.module}.{self.settings}"],
            log=self._log_path(), env=self.env, cwd=self.cwd,
            ready=lambda: client.exists(self.health_key), ready_timeout=timeout, grace=10,
            kill_group_after=False,
        )
        try:
            self.service.start()
        except ServiceError as exc:
            raise AssertionError(str(exc)) from None
        finally:
            client.close()
        return self

    def log_tail(self) -> str:
        return log_tail(self._log_path())

    def kill(self) -> None:
        if self.service is not None and self.service.running():
            with contextlib.suppress(ProcessLookupError):
                self.service.popen.kill()
            self.service.popen.wait(30)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (arq stops, letting running payloads finish), SIGKILL after timeout."""
        if self.service is not None:
            self.service.stop(timeout)

    def restart(self) -> None:
        self.kill()
        self.start()


def cleanup_session() -> None:
    """Delete what this session left in Redis (only keys carrying its prefix)."""
    with redis_client() as client:
        for pattern in (f"arq:*{SESSION}*", f"wove-adapters:arq:*{SESSION}*", f"{SESSION}*"):
            keys = list(client.scan_iter(pattern, count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
        stale = [m for m in client.zrange("arq:abort", 0, -1) if SESSION.encode() in m]
        if stale:
            client.zrem("arq:abort", *stale)


def environment(**config: Any) -> dict[str, Any]:
    """An environment definition for this session's queue and prefix."""
    executor_config = {
        "redis_url": REDIS_URL,
        "queue_name": f"{SESSION}-main",
        "job_id_prefix": PREFIX,
        **config,
    }
    return {"executor": "arq", "executor_config": executor_config}
