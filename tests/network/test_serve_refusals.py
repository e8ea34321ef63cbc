"""``wove-adapters serve`` refuses what is not authentic, before it unpickles a byte.

Every refused request carries a pickle that creates a marker file when unpickled
(``Bomb``); the file must never appear. ``test_the_bomb_goes_off_when_accepted`` shows it
would: the same pickle, correctly signed, is unpickled (by the task's process) and the
file appears. Signatures are computed here from wove's format (``wove-v1`` canonical
string, HMAC-SHA256), independently of ``core.netwire``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import pickle
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from services import free_port, port_open
from shared_servers import require_module

from wove_adapters.core import netwire

GRPC_INSTALL = "pip install 'wove-adapters[grpc]' (tox -e network installs it)"
WS_INSTALL = "pip install websockets (tox -e network installs it)"


class Bomb:
    """Unpickling it opens (creates) ``path``: the proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def bomb_body(marker: Path) -> bytes:
    frame = {
        "type": "run_task", "run_id": f"bomb:{uuid.uuid4().hex}", "task_id": "bomb",
        "callable_pickle": base64.b64encode(pickle.dumps(Bomb(marker))).decode(),
        "args_pickle": base64.b64encode(pickle.dumps({})).decode(), "delivery": {},
    }
    return json.dumps(frame).encode()


def wove_signature(secret: str, transport: str, target: str, body: bytes, *,
                   stamp: str | None = None, nonce: str | None = None,
                   key: str = "default") -> dict[str, str]:
    """wove's signed headers (wove/security.py), written out here."""
    stamp = str(int(time.time())) if stamp is None else stamp
    nonce = nonce or secrets.token_urlsafe(18)
    canonical = "\n".join(["wove-v1", transport, target, stamp, nonce,
                           hashlib.sha256(body).hexdigest()])
    digest = hmac.new(secret.encode(), canonical.encode(), hashlib.sha256).hexdigest()
    return {"X-Wove-Key": key, "X-Wove-Timestamp": stamp, "X-Wove-Nonce": nonce,
            "X-Wove-Signature": f"v1={digest}"}


def never_unpickled(served: Any, marker: Path, started_before: int) -> None:
    """Nothing ran and nothing was unpickled (given the time a run would take)."""
    time.sleep(0.5)
    assert not marker.exists(), "the refused pickle was unpickled"
    assert served.health()["runs"]["started"] == started_before


@pytest.fixture(scope="module")
def signed_http(serve_module: Callable[..., Any]) -> Any:
    return serve_module("http", security="signed")


@pytest.fixture(scope="module")
def bearer_http(serve_module: Callable[..., Any]) -> Any:
    return serve_module("http", security="bearer")


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / f"unpickled-{uuid.uuid4().hex[:8]}"


def test_the_bomb_goes_off_when_accepted(signed_http: Any, marker: Path) -> None:
    body = bomb_body(marker)
    status, answer = signed_http.post(body, wove_signature(signed_http.secret, "http", "/", body))
    assert status == 200, answer
    assert marker.exists()  # unpickled in the task's process: the marker works
    event = json.loads(answer)["events"][-1]
    assert event["type"] == "task_error"  # a file object is not callable


def _stale(served: Any, body: bytes) -> dict[str, str]:
    return wove_signature(served.secret, "http", "/", body, stamp=str(int(time.time()) - 1000))


def _bad_signature(served: Any, body: bytes) -> dict[str, str]:
    headers = wove_signature(served.secret, "http", "/", body)
    headers["X-Wove-Signature"] = "v1=" + "0" * 64
    return headers


def _wrong_secret(served: Any, body: bytes) -> dict[str, str]:
    return wove_signature("not-the-secret", "http", "/", body)


def _other_body(served: Any, body: bytes) -> dict[str, str]:
    return wove_signature(served.secret, "http", "/", b'{"type":"shutdown"}')


def _other_target(served: Any, body: bytes) -> dict[str, str]:
    return wove_signature(served.secret, "http", "/elsewhere", body)


def _unknown_key(served: Any, body: bytes) -> dict[str, str]:
    return wove_signature(served.secret, "http", "/", body, key="other")


@pytest.mark.parametrize(("forge", "status", "kind", "says"), [
    (lambda served, body: {}, 401, "unsigned", "not signed"),
    (_bad_signature, 403, "bad_signature", "bad signature"),
    (_wrong_secret, 403, "bad_signature", "bad signature"),
    (_other_body, 403, "bad_signature", "bad signature"),
    (_other_target, 403, "bad_signature", "bad signature"),
    (_stale, 403, "stale_timestamp", "timestamp outside"),
    (_unknown_key, 403, "unknown_key", "key id"),
], ids=["unsigned", "bad-signature", "wrong-secret", "body-swapped", "other-target", "stale",
        "unknown-key"])
def test_signed_http_refusals(signed_http: Any, marker: Path, forge: Any, status: int,
                              kind: str, says: str) -> None:
    before = signed_http.health()
    body = bomb_body(marker)
    got, answer = signed_http.post(body, forge(signed_http, body))
    assert got == status, answer
    assert says in json.loads(answer)["error"]
    never_unpickled(signed_http, marker, before["runs"]["started"])
    after = signed_http.health()
    assert after["refused"].get(kind, 0) == before["refused"].get(kind, 0) + 1
    assert after["refusals"] == before["refusals"] + 1


def test_replayed_request_is_refused(signed_http: Any, marker: Path) -> None:
    body = bomb_body(marker)
    headers = wove_signature(signed_http.secret, "http", "/", body)
    status, _ = signed_http.post(body, headers)
    assert status == 200 and marker.exists()  # the original is genuine
    marker.unlink()
    before = signed_http.health()
    status, answer = signed_http.post(body, headers)  # identical headers and body
    assert status == 403 and "replayed nonce" in json.loads(answer)["error"]
    never_unpickled(signed_http, marker, before["runs"]["started"])
    assert signed_http.health()["refused"]["replayed_nonce"] == \
        before["refused"].get("replayed_nonce", 0) + 1


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "Bearer wrong-token"}, 403),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, 403),
], ids=["no-token", "wrong-token", "basic-auth"])
def test_bearer_refusals(bearer_http: Any, marker: Path, headers: dict[str, str],
                         status: int) -> None:
    before = bearer_http.health()
    got, answer = bearer_http.post(bomb_body(marker), headers)
    assert got == status and "bearer token" in json.loads(answer)["error"]
    never_unpickled(bearer_http, marker, before["runs"]["started"])
    assert bearer_http.health()["refused"]["bad_token"] == before["refused"].get("bad_token", 0) + 1
    # The right token is taken (the refusals above were about the token, nothing else).
    good = bomb_body(marker)
    got, _ = bearer_http.post(good, {"Authorization": f"Bearer {bearer_http.token}"})
    assert got == 200 and marker.exists()


def test_grpc_refusals(serve_module: Callable[..., Any], marker: Path) -> None:
    grpc = require_module("grpc", "grpcio", GRPC_INSTALL)
    served = serve_module("grpc", security="signed")
    method = netwire.GRPC_METHOD
    body = bomb_body(marker)
    metadata_sets = {
        "unsigned": (),
        "bad-signature": tuple((k.lower(), v) for k, v in wove_signature(
            "not-the-secret", "grpc", method, body).items()),
        "stale": tuple((k.lower(), v) for k, v in wove_signature(
            served.secret, "grpc", method, body, stamp=str(int(time.time()) - 1000)).items()),
        "http-target": tuple((k.lower(), v) for k, v in wove_signature(
            served.secret, "http", "/", body).items()),
    }
    before = served.health()
    with grpc.insecure_channel(served.target) as channel:
        call = channel.unary_unary(method)
        for name, metadata in metadata_sets.items():
            with pytest.raises(grpc.RpcError) as caught:
                call(body, metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "refused" in caught.value.details(), name
        never_unpickled(served, marker, before["runs"]["started"])
        assert served.health()["refusals"] == before["refusals"] + len(metadata_sets)
        good = tuple((k.lower(), v) for k, v in wove_signature(
            served.secret, "grpc", method, body).items())
        answer = call(body, metadata=good, timeout=30)
    assert json.loads(answer)["events"][-1]["type"] == "task_error" and marker.exists()


def test_websocket_refusals(serve_module: Callable[..., Any], marker: Path) -> None:
    require_module("websockets", "wove's websocket client library", WS_INSTALL)
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    from websockets.sync.client import connect

    served = serve_module("websocket", security="signed")
    before = served.health()

    def handshake(headers: dict[str, str]) -> int:
        with pytest.raises(InvalidStatus) as caught:
            connect(served.url, additional_headers=headers, open_timeout=10)
        return int(caught.value.response.status_code)

    assert handshake({}) == 401
    assert handshake(wove_signature("not-the-secret", "websocket", "/", b"")) == 403
    assert handshake(wove_signature(served.secret, "websocket", "/", b"",
                                    stamp=str(int(time.time()) - 1000))) == 403
    genuine = wove_signature(served.secret, "websocket", "/", b"")
    with connect(served.url, additional_headers=genuine, open_timeout=10):
        pass
    assert handshake(genuine) == 403  # the same handshake again: a replayed nonce
    # Our signed extension: after a signed handshake, a plain frame is refused and the
    # connection closed (1008), nothing unpickled.
    extension = {**wove_signature(served.secret, "websocket", "/", b""),
                 netwire.SIGNED_ANSWER_HEADER: "1"}
    with connect(served.url, additional_headers=extension, open_timeout=10) as ws:
        ws.send(bomb_body(marker).decode())
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    never_unpickled(served, marker, before["runs"]["started"])
    after = served.health()
    assert after["refusals"] == before["refusals"] + 5
    assert after["refused"]["plain_frame"] == 1 and after["refused"]["replayed_nonce"] == 1


# ---------------------------------------------------------------- start-up refusals


@pytest.mark.parametrize(("args", "says"), [
    (["--transport", "http", "--security", "env:{var}"], "without TLS"),
    (["--transport", "websocket", "--bearer-token-env", "{var}"], "without TLS"),
    (["--transport", "grpc", "--security", "none"], "without TLS (--tls-cert/--tls-key) and "
                                                    "authentication"),
    (["--transport", "https", "--security", "none", "--tls-cert", "{cert}", "--tls-key",
      "{key}"], "without authentication"),
], ids=["http-signed", "websocket-bearer", "grpc-nothing", "https-no-auth"])
def test_non_loopback_bind_needs_tls_and_authentication(
        run_cli: Callable[..., Any], tls_files: tuple[Path, Path], args: list[str],
        says: str) -> None:
    var = f"WOVE_TEST_BIND_{uuid.uuid4().hex[:6].upper()}"
    cert, key = tls_files
    port = free_port()
    argv = [a.format(var=var, cert=cert, key=key) for a in args]
    done = run_cli("serve", "--listen", f"0.0.0.0:{port}", *argv,
                   env={var: "s3cret-value"}, timeout=30)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr  # one line that names the fix
    assert "non-loopback address 0.0.0.0" in lines[0] and says in lines[0], lines[0]
    assert "s3cret-value" not in done.stderr + done.stdout
    assert not port_open(port)  # and nothing listens there


def test_loopback_bind_without_auth_must_say_so(run_cli: Callable[..., Any]) -> None:
    done = run_cli("serve", "--transport", "http", "--listen", f"127.0.0.1:{free_port()}",
                   timeout=30)
    assert done.returncode != 0 and "choose authentication" in done.stderr


def test_serve_removes_the_secret_from_the_tasks_environment(signed_http: Any,
                                                             tmp_path: Path) -> None:
    """The task runs with the service's environment minus the network secret."""
    def environment() -> dict[str, str]:
        import os

        return dict(os.environ)

    frame = netwire.dump_message({"type": "run_task", "run_id": "env:1", "task_id": "env",
                                  "callable": environment, "args": {}, "delivery": {}})
    status, answer = signed_http.post(frame, wove_signature(signed_http.secret, "http", "/",
                                                            frame))
    assert status == 200
    events = [netwire.decode_frame(e) for e in netwire.raw_events(json.loads(answer))]
    seen = events[-1]["result"]
    assert signed_http.env_var not in seen
    assert signed_http.secret not in "".join(seen.values())
    assert os.environ[signed_http.env_var] == signed_http.secret  # ours, not the task's
