"""Forged, replayed, tampered and malformed input is refused and resolves nothing."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wove_adapters import Hub
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, signing
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.codec import frame_to_wire
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file
from wove_adapters.worker import sender


def post(url: str, data: bytes, path_token: str | None = None) -> int:
    if path_token is not None:
        url = url.rsplit("/", 1)[0] + "/" + path_token
    request = urllib.request.Request(url, data=data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.fixture(scope="module")
def hub() -> Any:
    with Hub(environments={"p": {"executor": "process"}}, default_environment="p") as h:
        yield h


def running(hub: Hub, tmp_path: Path) -> tuple[Any, Any]:
    future = hub.submit(tasks.sleepy, str(tmp_path), "victim", 3.0)
    wait_for_file(tmp_path / "victim.started", 20)
    return future, hub.dispatcher("p").transport.receiver  # type: ignore[attr-defined]


def result_event(run_id: str, value: Any) -> frames.WireEvent:
    return frame_to_wire(
        {"type": "task_result", "run_id": run_id, "task_id": "sleepy", "result": value}
    )


def test_forged_event_is_rejected_and_does_not_resolve_the_run(hub: Hub, tmp_path: Path) -> None:
    future, receiver = running(hub, tmp_path)
    event = result_event(future.run_id, "forged")
    forged_key = signing.Keyring()
    key_id = forged_key.add(os.urandom(32))
    body = msgspec.msgpack.encode(frames.EventBatch(events=[event]))
    blob = signing.sign(body, key_id, keyring=forged_key)
    assert post(receiver.url, signing.encode_blob(blob)) == 401
    # Same key id as the real one but a wrong signature.
    real = sender.sign_events([event], hub.dispatcher("p").key_id)
    bad = signing.SignedBlob(real.key_id, real.timestamp, real.nonce, b"\0" * 32, real.body)
    assert post(receiver.url, signing.encode_blob(bad)) == 401
    # A valid signature sent to the wrong token.
    assert post(receiver.url, signing.encode_blob(real), path_token="wrong-token") == 404
    assert future.result(timeout=20) == "victim"


def test_replayed_event_is_rejected(hub: Hub, tmp_path: Path) -> None:
    future, receiver = running(hub, tmp_path)
    heartbeat = frames.Heartbeat(run_id=future.run_id, task_id="sleepy")
    blob = signing.encode_blob(sender.sign_events([heartbeat], hub.dispatcher("p").key_id))
    assert post(receiver.url, blob) == 200
    assert post(receiver.url, blob) == 409
    stale = sender.sign_events([result_event(future.run_id, "stale")], hub.dispatcher("p").key_id)
    old = signing.sign(stale.body, stale.key_id)
    old = signing.SignedBlob(old.key_id, time.time() - 3600, old.nonce, old.signature, old.body)
    assert post(receiver.url, signing.encode_blob(old)) == 401
    assert future.result(timeout=20) == "victim"


def _payload(hub: Hub, tmp_path: Path) -> str:
    receiver_url = "http://127.0.0.1:9/wove/events/none"
    envelope = payload_mod.build_envelope(
        adapter="process",
        run_id="r:1",
        task_id="add",
        attempt=1,
        func=tasks.add,
        args={"x": 1},
        return_path=payload_mod.ReturnPath(url=receiver_url),
        delivery={},
        key_id=hub.dispatcher("p").key_id,
        inline_limit=1 << 20,
        store_url=None,
    )
    return payload_mod.encode_payload(envelope)


def _run_worker(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "payload"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "wove_adapters.worker", "--payload-file", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "WOVE_ADAPTERS_RETRY_SECONDS": "1"},
    )


def test_tampered_and_unsigned_payloads_are_refused(hub: Hub, tmp_path: Path) -> None:
    text = _payload(hub, tmp_path)
    raw = bytearray(base64.urlsafe_b64decode(text[len("wove1.") :]))
    raw[-20] ^= 0xFF  # flip a byte inside the pickled body
    tampered = "wove1." + base64.urlsafe_b64encode(bytes(raw)).decode()
    result = _run_worker(tampered, tmp_path)
    assert result.returncode == 2
    assert "payload refused" in result.stderr and "signature" in result.stderr
    unsigned = _run_worker(base64.b64encode(b"cloudpickle bytes").decode(), tmp_path)
    assert unsigned.returncode == 2 and "unsigned or foreign payload" in unsigned.stderr


def test_large_argument_goes_through_the_store(hub: Hub) -> None:
    data = os.urandom(20 * 1024 * 1024)
    store = Path(os.environ["WOVE_ADAPTERS_HOME"]) / "payloads"
    assert hub.run(tasks.digest, data) == tasks.digest(data)
    # The store is cleaned once the run ends.
    time.sleep(0.3)
    assert not [p for p in store.glob("*") if p.stat().st_size > 10 * 1024 * 1024]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        st.binary(max_size=2048),
        st.builds(
            lambda items: msgspec.msgpack.encode(items),
            st.lists(
                st.one_of(
                    st.text(),
                    st.integers(min_value=-(2**63), max_value=2**63),
                    st.binary(),
                    st.none(),
                ),
                max_size=6,
            ),
        ),
    ),
    token=st.one_of(st.none(), st.text(alphabet="abcdefghij-_", min_size=1, max_size=30)),
)
def test_receiver_survives_malformed_requests(hub: Hub, body: bytes, token: str | None) -> None:
    receiver = hub.dispatcher("p").transport.receiver  # type: ignore[attr-defined]
    status = post(receiver.url, body, path_token=token)
    assert 400 <= status < 500


def test_receiver_still_serves_after_the_fuzz(hub: Hub) -> None:
    assert hub.run(tasks.add, 1) == 2


def test_oversized_body_is_refused(hub: Hub) -> None:
    receiver = hub.dispatcher("p").transport.receiver  # type: ignore[attr-defined]
    limit = receiver.max_body
    receiver.max_body = 1024
    try:
        assert post(receiver.url, b"x" * 4096) == 413
    finally:
        receiver.max_body = limit
    shared_loop.run_sync(receiver.ready.wait())
