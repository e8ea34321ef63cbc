"""The conformance suite for our four network executors against real `wove-adapters serve`
processes: http (signed), https (bearer, a certificate made here), grpc (signed) and
websocket (bearer).

For a network executor the worker is the service: ``kill_worker`` SIGKILLs the
`wove-adapters serve` process (its payload processes die with it) and starts it again on
the same port, so the run's connection drops and the orphan policy applies (``requeue``
waits for the restarted service). Two checks written for adapters with a callback
receiver are restated for a path with none: the answer is the run's own stream.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import PayloadError
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import AdapterConformance, tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file

SECRET_ENV = "WOVE_TEST_NETWORK_SECRET"
WRONG_ENV = "WOVE_TEST_NETWORK_WRONG"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (the client trusts it as
    its ca_file)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


class Served:
    """One `wove-adapters serve` subprocess, restartable on the same port."""

    def __init__(self, transport: str, workdir: Path, *, bearer: bool = False,
                 tls: bool = False, max_tasks: int = 2, extra: tuple[str, ...] = ()) -> None:
        self.transport = transport
        self.workdir = workdir
        self.bearer = bearer
        self.port = free_port()
        self.health_port = free_port() if transport == "grpc" else self.port
        self.cert: Path | None = None
        self.key: Path | None = None
        if tls:
            self.cert, self.key = make_certificate(workdir)
        self.max_tasks = max_tasks
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"serve-{transport}.log"
        self.starts = 0

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def address(self) -> str:
        if self.transport == "grpc":
            return f"127.0.0.1:{self.port}"
        scheme = {"http": "http", "https": "https", "websocket": "ws"}[self.transport]
        if self.transport == "websocket" and self.tls:
            scheme = "wss"
        return f"{scheme}://127.0.0.1:{self.port}/"

    def executor_config(self, secret_env: str = SECRET_ENV) -> dict[str, Any]:
        security: Any = ({"type": "bearer", "token_env": secret_env} if self.bearer
                         else f"env:{secret_env}")
        config: dict[str, Any] = {"security": security}
        config["target" if self.transport == "grpc" else "url"] = self.address
        if self.tls:
            config["ca_file"] = str(self.cert)
            if self.transport == "grpc":
                config["secure"] = True
        return config

    def command(self) -> list[str]:
        auth = (["--bearer-token-env", SECRET_ENV] if self.bearer
                else ["--security", f"env:{SECRET_ENV}"])
        command = [sys.executable, "-m", "wove_adapters.cli", "serve",
                   "--transport", self.transport, "--listen", f"127.0.0.1:{self.port}",
                   *auth, "--max-tasks", str(self.max_tasks), "--kill-after", "3",
                   "--drain-timeout", "20", *self.extra]
        if self.tls:
            command += ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]
        if self.transport == "grpc":
            command += ["--health-listen", f"127.0.0.1:{self.health_port}"]
        return command

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.starts += 1
        scheme = "https" if self.tls and self.transport != "grpc" else "http"
        context = ssl.create_default_context(cafile=str(self.cert)) if scheme == "https" \
            else None
        url = f"{scheme}://127.0.0.1:{self.health_port}/healthz"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1, context=context):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"serve did not answer {url} within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(15)
            except subprocess.TimeoutExpired:
                self.kill()


def running(transport: str, workdir: Path, **options: Any) -> Iterator[Served]:
    os.environ.setdefault(SECRET_ENV, f"network-secret-{uuid.uuid4().hex}")
    served = Served(transport, workdir, **options)
    served.start()
    try:
        yield served
    finally:
        served.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class NetworkConformance(AdapterConformance):
    """The suite for one network executor; ``served`` runs its service for the class."""

    executor = ""
    bearer = False
    tls = False
    detection_timeout = 30.0
    heartbeat_seconds = 2.0

    @pytest.fixture(scope="class")
    @classmethod
    def served(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
        workdir = tmp_path_factory.mktemp(f"serve-{cls.executor}")
        yield from running(cls.executor, workdir, bearer=cls.bearer, tls=cls.tls)

    @pytest.fixture(autouse=True)
    def _bind(self, served: Served) -> None:
        self.service = served
        if served.proc is None or served.proc.poll() is not None:
            served.start()  # a test that stopped it (or a crash) must not cascade

    @pytest.fixture
    def environment(self, served: Served) -> dict[str, Any]:
        return {"executor": self.executor, "executor_config": served.executor_config()}

    @pytest.fixture
    def worker_slots(self, served: Served) -> int:
        return served.max_tasks

    def kill_worker(self, pid: int) -> None:
        """The service is the network executor's worker: SIGKILL it (the payload process
        ``pid`` dies with it), then start it again on the same port."""
        self.service.kill()
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the payload process outlived its service"
        self.service.start()

    def check_weave_pids(self, pids: set[int]) -> None:
        assert os.getpid() not in pids
        assert self.service.proc is not None and self.service.proc.pid not in pids, \
            "the weave's items ran in the service process itself, not its payload processes"

    # --------------------------------------------------- restated for a network path

    def test_refused_payload_fails_naming_the_key_and_is_not_requeued(
        self, environment: dict[str, Any], markers: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A request the service cannot authenticate (another secret) is refused before
        anything is unpickled: the run fails with PayloadError naming
        executor_config.security, nothing ran, and it is not requeued."""
        monkeypatch.setenv(WRONG_ENV, f"not-the-service-secret-{uuid.uuid4().hex}")
        definition = {
            "executor": self.executor,
            "executor_config": self.service.executor_config(WRONG_ENV),
            "delivery_orphan_policy": "requeue",
        }
        with Hub(environments={"refused": definition}, default_environment="refused") as hub:
            future = hub.submit(tasks.record, str(markers), "refused", 1)
            with pytest.raises(PayloadError, match="executor_config.security") as info:
                future.result(timeout=self.detection_timeout)
            assert "refused the request" in str(info.value)
            dispatcher = hub.dispatcher("refused")
            shared_loop.run_sync(dispatcher.flush())
            record = shared_loop.run_sync(dispatcher.ledger.get(future.run_id))
            assert record is not None and record.attempt == 1, "a refused request was requeued"
            assert dispatcher.stats["requeued"] == 0  # its own environment: no other runs
        assert not (markers / "refused.runs").exists(), "a refused request ran"

    def test_duplicate_terminal_event_is_dropped(self, hub_for: Any, markers: Path) -> None:
        """A best-effort cancel resolves the caller at once; the service's own
        task_cancelled comes later on the run's stream. It must not reach the caller a
        second time: it is taken as the proof that the job stopped, which frees the
        in-flight slot (the next run starts)."""
        hub = hub_for(delivery_max_in_flight=1)
        dispatcher = hub.dispatcher("conformance")
        unconfirmed = dispatcher.stats["released_unconfirmed"]
        future = hub.submit(tasks.sleepy, str(markers), "dup", 30.0)
        wait_for_file(markers / "dup.started", self.detection_timeout)
        hub.cancel(future, mode="best_effort")
        with pytest.raises(CancelledErrors):
            future.result(timeout=self.detection_timeout)
        deadline = time.monotonic() + self.detection_timeout
        while future.run_id in dispatcher.stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        assert future.run_id not in dispatcher.stopping, "the service never confirmed the stop"
        assert dispatcher.stats["released_unconfirmed"] == unconfirmed
        assert hub.run(tasks.add, 1, y=1) == 2
        assert not (markers / "dup.finished").exists()

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Path) -> None:
        """No receiver here: the outcome rides the run's stream. A service told to stop
        (SIGTERM) while the run is in flight finishes it and delivers the outcome before
        it exits (its drain), instead of losing it."""
        hub = hub_for()
        lost = hub.dispatcher("conformance").stats["lost"]
        future = hub.submit(tasks.sleepy, str(markers), "drain", 1.5)
        wait_for_file(markers / "drain.started", self.detection_timeout)
        assert self.service.terminate(30) == 0
        assert future.result(timeout=self.detection_timeout) == "drain"
        assert hub.dispatcher("conformance").stats["lost"] == lost
        self.service.start()


class TestHttpConformance(NetworkConformance):
    executor = "http"


class TestHttpsConformance(NetworkConformance):
    executor = "https"
    bearer = True
    tls = True


class TestGrpcConformance(NetworkConformance):
    executor = "grpc"
    extra = "grpc"
    library = ("grpc",)


class TestWebSocketConformance(NetworkConformance):
    executor = "websocket"
    bearer = True
