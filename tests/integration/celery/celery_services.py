"""Start and stop real Celery workers for the tests and the benchmark.

Each ``CeleryService`` is one broker flavour (Redis or RabbitMQ) with its own queue name
and Redis key prefix (``wove-test-celery-<uuid8>``), so runs never see each other's
messages or results, and one ``celery -A celery_test_app worker --pool=prefork`` process
started in its own session and stopped by its PID (``tests/support/services.py``).
Nothing here sleeps blindly: a worker is ready when it answers a ``ping`` addressed to its
node name.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
from services import ServiceError, ServiceProcess  # noqa: E402

REDIS_URL = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("WOVE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")

HOW_TO_START = {
    "redis": "start it with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379` "
             "(or set WOVE_TEST_REDIS_URL)",
    "amqp": "start it with `rabbitmq-server -detached` (guest/guest on 127.0.0.1:5672, "
            "or set WOVE_TEST_AMQP_URL)",
}


def require_service(kind: str, url: str) -> None:
    """Raise RuntimeError naming how to start the service if nothing listens at ``url``."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or (6379 if kind == "redis" else 5672)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        raise RuntimeError(
            f"{kind} is not reachable at {host}:{port} ({exc}): the Celery tests need a real "
            f"broker; {HOW_TO_START[kind]}"
        ) from None


@dataclass
class CeleryService:
    """One broker flavour with a worker consuming a private queue."""

    broker: str  # "redis" | "amqp"
    concurrency: int = 1
    tag: str = field(default_factory=lambda: f"wove-test-celery-{uuid.uuid4().hex[:8]}")
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("TMPDIR", "/tmp")))
    extra_config: dict[str, Any] = field(default_factory=dict)
    # The Redis the worker uses as result backend (and broker, for "redis"): the fault
    # tests point it at a private redis-server they kill and restart.
    redis_url: str = REDIS_URL
    # More directories for the worker's PYTHONPATH (modules of the tasks it runs).
    pythonpath: tuple[str, ...] = ()
    # More environment variables for the worker (e.g. WOVE_ADAPTERS_TRACING_INIT).
    extra_env: dict[str, str] = field(default_factory=dict)
    service: ServiceProcess | None = None
    log_path: Path | None = None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return None if self.service is None else self.service.proc

    @property
    def queue(self) -> str:
        return self.tag

    @property
    def prefix(self) -> str:
        return f"{self.tag}:"

    @property
    def broker_url(self) -> str:
        return self.redis_url if self.broker == "redis" else AMQP_URL

    @property
    def celery_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "result_backend_transport_options": {"global_keyprefix": self.prefix},
            "result_expires": 3600,
            **self.extra_config,
        }
        if self.broker == "redis":
            config["broker_transport_options"] = {"global_keyprefix": self.prefix}
        return config

    @property
    def executor_config(self) -> dict[str, Any]:
        return {
            "broker_url": self.broker_url,
            "result_backend": self.redis_url,
            "queue": self.queue,
            "celery_config": self.celery_config,
        }

    @property
    def node(self) -> str:
        return f"{self.tag}@{socket.gethostname()}"

    def client_app(self) -> Any:
        from celery import Celery

        from wove_adapters.adapters.celery import BASE_CONF

        app = Celery("wove-test-client", broker=self.broker_url, backend=self.redis_url,
                     set_as_current=False)
        app.conf.update(BASE_CONF)
        app.conf.update(self.celery_config)
        return app

    # ------------------------------------------------------------ the worker process

    def start(self, timeout: float = 120.0, *, app_module: str = "celery_test_app",
              extra_args: tuple[str, ...] = ()) -> None:
        require_service("redis", self.redis_url)
        if self.broker == "amqp":
            require_service("amqp", AMQP_URL)
        self.log_path = self.log_dir / f"{self.tag}.log"
        env = {
            **os.environ,
            "WOVE_TEST_CELERY_BROKER": self.broker_url,
            "WOVE_TEST_CELERY_BACKEND": self.redis_url,
            "WOVE_TEST_CELERY_CONFIG": json.dumps(self.celery_config),
            # What `-A wove_adapters.adapters.celery:worker_app` reads.
            "WOVE_CELERY_BROKER_URL": self.broker_url,
            "WOVE_CELERY_RESULT_BACKEND": self.redis_url,
            "WOVE_CELERY_CONFIG": json.dumps(self.celery_config),
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), *self.pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            **self.extra_env,
        }
        command = [
            sys.executable, "-m", "celery", "-A", app_module, "worker",
            "--pool=prefork", "-c", str(self.concurrency), "-Q", self.queue, "-n", self.node,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=INFO", *extra_args,
        ]
        self.service = ServiceProcess(
            f"the celery worker {self.node}", command, log=self.log_path, env=env, cwd=HERE,
            grace=20, append_log=True,
        ).launch()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the worker answers a ping addressed to its node name."""
        assert self.service is not None, "the worker was never started"
        app = self.client_app()
        try:
            self.service.wait_ready(
                timeout, ready=lambda: app.control.ping(destination=[self.node], timeout=0.5)
            )
        except ServiceError as exc:
            raise RuntimeError(str(exc)) from None
        finally:
            app.close()

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the worker (a warm shutdown: it stops its prefork children), by its
        PID; SIGKILL its process group if it does not go in time, and children that
        outlived their parent (killed mid-test) afterwards."""
        service, self.service = self.service, None
        if service is not None:
            service.stop()

    def kill(self) -> None:
        """SIGKILL the whole worker, main process and prefork children (its process
        group, which only this worker is in), as a crashed host would."""
        service, self.service = self.service, None
        assert service is not None, "the worker is not running"
        service.kill()

    def cleanup(self) -> None:
        """Delete this run's keys (by prefix) and, on RabbitMQ, its queue."""
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            batch = []
            for key in client.scan_iter(match=f"{self.prefix}*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
        finally:
            client.close()
        if self.broker == "amqp":
            from kombu import Connection, Queue

            with contextlib.suppress(Exception), Connection(AMQP_URL) as connection:
                channel = connection.channel()
                Queue(self.queue, channel=channel).delete()
                channel.close()


def running(broker: str, log_dir: Path, *, concurrency: int = 1,
            **options: Any) -> Iterator[CeleryService]:
    """A started worker on ``broker`` for a fixture to ``yield from``: one that does not
    come up fails the test with its log's tail; stopped and cleaned up afterwards.
    ``options``: more ``CeleryService`` fields (``pythonpath``, ``extra_env``)."""
    import pytest  # benchmarks import this module without pytest

    service = CeleryService(broker, concurrency=concurrency, log_dir=log_dir, **options)
    try:
        service.start()
    except RuntimeError as exc:
        service.stop()
        service.cleanup()
        pytest.fail(str(exc), pytrace=False)
    yield service
    service.stop()
    service.cleanup()


def wait_state(app: Any, task_id: str, state: str, timeout: float = 30.0) -> None:
    """Wait until Celery reports ``state`` for ``task_id`` (what the worker wrote)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = app.AsyncResult(task_id).state
        if seen == state:
            return
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} stayed {seen}, expected {state}")
