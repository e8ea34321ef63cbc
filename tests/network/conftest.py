"""``wove-adapters serve`` as a real subprocess, per transport and security mode.

Fixtures (reuse them; nothing here mocks a component of ours):

``serve(transport, security="signed", tls=False, **flags) -> Served``
    A factory (function scope; ``serve_module`` is the same at module scope, for tests
    that share one service). Starts ``wove-adapters serve`` (the console script next to
    this Python) on a free 127.0.0.1 port, waits until its ``/healthz`` answers (for gRPC
    the fixture adds ``--health-listen`` on a second free port), and stops it by PID
    (SIGTERM, then SIGKILL of its process group) at teardown.

    - ``transport``: ``"http"``, ``"https"``, ``"grpc"`` or ``"websocket"``.
    - ``security``: ``"signed"`` (``--security env:VAR``, a fresh secret), ``"bearer"``
      (``--bearer-token-env VAR``, a fresh token) or ``"none"`` (loopback only).
    - ``tls``: serve with the session's self-signed certificate (``tls_files``); implied
      by ``"https"``. While a TLS service runs, ``SSL_CERT_FILE`` in this process points
      at that certificate, so clients that use the default trust store (wove's urllib
      and websockets clients) trust it; it is restored at teardown.
    - ``**flags``: more command-line flags, ``max_tasks=2`` -> ``--max-tasks 2``; ``True``
      for a bare flag.

``Served`` (what the factory returns):
    ``transport``, ``security``, ``tls``, ``port``, ``url`` (``http(s)://127.0.0.1:P/``,
    ``ws(s)://127.0.0.1:P/``, or the gRPC target ``127.0.0.1:P``), ``target``
    (``127.0.0.1:P``), ``health_url``, ``env_var`` (the variable that holds the secret or
    token, set in this process too, so wove's ``security: "env:VAR"`` works here),
    ``secret``, ``token``, ``cert`` / ``key`` (server certificate and key; the certificate
    is also the client's CA), ``process`` (``tests/support/services.ServiceProcess``),
    ``pid``, ``log``; and:

    - ``security_config``: wove's ``executor_config["security"]`` for this service;
    - ``executor_config(**extra)``: a ready wove ``executor_config`` (url or target,
      security, TLS roots for gRPC);
    - ``client_security()``: a ``core.netwire.Security`` holding the same secret/token;
    - ``auth_headers(body, transport=..., target=...)``: valid authentication headers;
    - ``post(body, headers)``: a raw POST to ``/``, ``(status, body)``, never raising;
    - ``health()``: ``/healthz`` as a dict;
    - ``terminate(timeout)``: SIGTERM and wait; returns the exit code;
    - ``log_text()``: what the service wrote.

``tls_files``: ``(cert, key)`` of a self-signed certificate for ``localhost`` and
``127.0.0.1`` (made once per session with ``openssl req``).

``run_cli(*args, env=None) -> CompletedProcess``: ``wove-adapters ...`` run to completion
(for start-up refusals).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

from services import ServiceProcess, free_port

from wove_adapters.core import netwire

CLI = str(Path(sys.executable).parent / "wove-adapters")


@dataclass
class Served:
    """One running ``wove-adapters serve`` (see the module docstring)."""

    transport: str
    security: str
    tls: bool
    port: int
    health_port: int
    env_var: str | None
    secret: str | None
    token: str | None
    cert: Path | None
    key: Path | None
    process: ServiceProcess
    flags: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        if self.transport == "grpc":
            return self.target
        scheme = {"http": "http", "https": "https", "websocket": "wss" if self.tls else "ws"}
        return f"{scheme[self.transport]}://127.0.0.1:{self.port}/"

    @property
    def health_url(self) -> str:
        scheme = "https" if self.tls and self.transport != "grpc" else "http"
        return f"{scheme}://127.0.0.1:{self.health_port}/healthz"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log(self) -> Path:
        return self.process.log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def security_config(self) -> Any:
        if self.security == "signed":
            return f"env:{self.env_var}"
        if self.security == "bearer":
            return {"type": "bearer", "token_env": self.env_var}
        return "none"

    def executor_config(self, **extra: Any) -> dict[str, Any]:
        config: dict[str, Any] = {"security": self.security_config}
        if self.transport == "grpc":
            config["target"] = self.target
            if self.tls:
                assert self.cert is not None
                config["secure"] = True
                config["root_certificates"] = self.cert.read_bytes()
        else:
            config["url"] = self.url
        config.update(extra)
        return config

    def client_security(self) -> netwire.Security:
        if self.security == "signed":
            return netwire.Security(mode="signed", secret=str(self.secret).encode())
        if self.security == "bearer":
            return netwire.Security(mode="bearer", token=str(self.token))
        return netwire.Security()

    def auth_headers(self, body: bytes, *, transport: str = "http",
                     target: str = "/") -> dict[str, str]:
        return self.client_security().headers_for(transport, target, body)

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls or self.cert is None:
            return None
        return ssl.create_default_context(cafile=str(self.cert))

    def post(self, body: bytes, headers: dict[str, str], *,
             timeout: float = 30.0) -> tuple[int, bytes]:
        """A raw POST to ``/`` (HTTP transports): status and body; 0 when no answer."""
        scheme = "https" if self.tls else "http"
        request = urllib.request.Request(
            f"{scheme}://127.0.0.1:{self.port}/", data=body, method="POST",
            headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=timeout,
                                        context=self.ssl_context()) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def health(self, timeout: float = 5.0) -> dict[str, Any]:
        context = self.ssl_context() if self.transport != "grpc" else None
        try:
            with urllib.request.urlopen(self.health_url, timeout=timeout,
                                        context=context) as answer:
                return dict(json.loads(answer.read()))
        except urllib.error.HTTPError as exc:  # 503 while draining: still an answer
            return dict(json.loads(exc.read()))

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM by PID (the drain), then wait for the exit code."""
        proc = self.process.popen
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)


class ServeFactory:
    """Starts services for one scope and stops them all at its end."""

    def __init__(self, directory: Path, tls_files: tuple[Path, Path]) -> None:
        self.directory = directory
        self.tls_files = tls_files
        self.started: list[Served] = []
        self.env_vars: list[str] = []
        self.saved_cert_file: list[str | None] = []

    def __call__(self, transport: str, security: str = "signed", tls: bool = False,
                 **flags: Any) -> Served:
        tls = tls or transport == "https"
        port, health_port = free_port(), free_port()
        if transport == "grpc":
            while health_port == port:
                health_port = free_port()
        else:
            health_port = port
        env = dict(os.environ)
        argv = [CLI, "serve", "--transport", transport, "--listen", f"127.0.0.1:{port}"]
        env_var = secret = token = None
        if security in ("signed", "bearer"):
            env_var = f"WOVE_TEST_SERVE_{secrets.token_hex(4).upper()}"
            value = secrets.token_urlsafe(24)
            os.environ[env_var] = env[env_var] = value
            self.env_vars.append(env_var)
            if security == "signed":
                secret = value
                argv += ["--security", f"env:{env_var}"]
            else:
                token = value
                argv += ["--bearer-token-env", env_var]
        elif security == "none":
            argv += ["--security", "none"]
        else:
            raise ValueError(f"security {security!r}: signed, bearer or none")
        cert = key = None
        if tls:
            cert, key = self.tls_files
            argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
            self.saved_cert_file.append(os.environ.get("SSL_CERT_FILE"))
            os.environ["SSL_CERT_FILE"] = str(cert)
        if transport == "grpc":
            argv += ["--health-listen", f"127.0.0.1:{health_port}"]
        for name, value in flags.items():
            option = "--" + name.replace("_", "-")
            argv += [option] if value is True else [option, str(value)]
        log = self.directory / f"serve-{transport}-{security}-{port}.log"
        served = Served(transport=transport, security=security, tls=tls, port=port,
                        health_port=health_port, env_var=env_var, secret=secret, token=token,
                        cert=cert, key=key, flags=flags,
                        process=ServiceProcess(f"wove-adapters serve ({transport})", argv,
                                               log=log, env=env, ready_timeout=30.0,
                                               grace=20.0))
        served.process.ready = lambda: served.health(timeout=1.0).get("ok")
        served.process.start()
        self.started.append(served)
        return served

    def close(self) -> None:
        for served in reversed(self.started):
            served.process.stop()
        for name in self.env_vars:
            os.environ.pop(name, None)
        if self.saved_cert_file:
            first = self.saved_cert_file[0]
            if first is None:
                os.environ.pop("SSL_CERT_FILE", None)
            else:
                os.environ["SSL_CERT_FILE"] = first


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1, made with openssl."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture
def serve(tmp_path: Path, tls_files: tuple[Path, Path]) -> Iterator[Callable[..., Served]]:
    factory = ServeFactory(tmp_path, tls_files)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory,
                 tls_files: tuple[Path, Path]) -> Iterator[Callable[..., Served]]:
    factory = ServeFactory(tmp_path_factory.mktemp("serve"), tls_files)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    def _run(*args: str, env: dict[str, str] | None = None,
             timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})

    return _run
