"""Keys are managed like keys: one attack a test, each asserting the attack fails.

- a key id that is not a key id (a path, a FIFO's name) never touches the filesystem;
- a key file or keys directory someone else could have written is refused, with the fix;
- a key file that is a FIFO is refused at once (it froze every run of a caller before);
- generated keys expire, and expired key files are pruned;
- a worker accepts older keys after a rotation (WOVE_ADAPTERS_SECRETS);
- a NaN or far-future timestamp, an unsupported version, or a payload past its maximum
  age is refused.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import pytest

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.core.errors import PayloadError
from wove_adapters.testing import tasks


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private data dir: the keys under test are this test's alone."""
    monkeypatch.setenv("WOVE_ADAPTERS_HOME", str(tmp_path / "home"))
    for name in (signing.SECRET_ENV, signing.SECRETS_ENV, signing.KEY_TTL_ENV):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def _write_key(home: Path, key: bytes, *, mode: int = 0o600, extra: str = "") -> Path:
    keys = home / "keys"
    keys.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = keys / f"{signing.key_id_for(key)}.key"
    path.write_text(key.hex() + extra)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "key_id", ["../../../../etc/passwd", "/dev/zero", "0123456789abcdeg", "A" * 16, "x" * 10_000]
)
def test_malformed_key_id_never_reaches_the_filesystem(home: Path, key_id: str) -> None:
    with pytest.raises(PayloadError, match="malformed key id"):
        signing.Keyring().get(key_id)
    assert not (home / "keys").exists() or not any((home / "keys").iterdir())


def test_fifo_key_file_is_refused_without_blocking(home: Path) -> None:
    keys = home / "keys"
    keys.mkdir(parents=True, mode=0o700)
    key_id = "0123456789abcdef"
    os.mkfifo(keys / f"{key_id}.key", 0o600)
    outcome: list[BaseException | None] = []

    def look() -> None:
        try:
            signing.Keyring().get(key_id)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=look, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "reading a FIFO key file blocked"
    assert time.monotonic() - started < 2
    assert isinstance(outcome[0], PayloadError) and "not a regular file" in str(outcome[0])


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_writable_key_file_is_refused_with_the_fix(home: Path, mode: int) -> None:
    key = secrets.token_bytes(32)
    path = _write_key(home, key, mode=mode)
    with pytest.raises(PayloadError, match=f"chmod go-w {path}"):
        signing.Keyring().get(signing.key_id_for(key))


def test_writable_keys_directory_is_refused(home: Path) -> None:
    key = secrets.token_bytes(32)
    _write_key(home, key)
    (home / "keys").chmod(0o777)
    with pytest.raises(PayloadError, match="group- or world-writable"):
        signing.Keyring().get(signing.key_id_for(key))


@pytest.mark.skipif(os.getuid() != 0, reason="planting a file owned by another user needs root")
def test_planted_key_of_another_user_is_refused(home: Path) -> None:
    """A co-tenant's key file (owned by someone else) does not make a worker run its
    holder's payloads."""
    key = secrets.token_bytes(32)
    path = _write_key(home, key)
    os.chown(path, 65534, 65534)  # nobody
    with pytest.raises(PayloadError, match="owned by uid 65534"):
        signing.Keyring().get(signing.key_id_for(key))


def test_generated_keys_expire_and_are_pruned(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = secrets.token_bytes(32)
    expired = _write_key(home, old, extra=f"\nexpires {time.time() - 10:.0f}\n")
    with pytest.raises(PayloadError, match="expired"):
        signing.Keyring().get(signing.key_id_for(old))
    monkeypatch.setenv(signing.KEY_TTL_ENV, "60")
    ring = signing.Keyring()
    fresh = ring.generate()
    assert not expired.exists(), "an expired key file was not pruned"
    text = (home / "keys" / f"{fresh}.key").read_text().split()
    assert text[1] == "expires" and 50 < float(text[2]) - time.time() <= 61
    assert signing.Keyring().get(fresh) == ring.get(fresh)


def test_rotation_old_keys_still_verify_on_the_worker(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = "old-" + secrets.token_hex(16), "new-" + secrets.token_hex(16)
    caller = signing.Keyring()
    old_id = caller.add(old.encode())
    blob = signing.sign(b"queued before the rotation", old_id, keyring=caller)
    monkeypatch.setenv(signing.SECRET_ENV, new)
    worker = signing.Keyring()
    with pytest.raises(PayloadError, match="unknown key"):
        signing.verify(blob, keyring=worker, window=None)
    monkeypatch.setenv(signing.SECRETS_ENV, f"{new}, {old}")
    assert signing.verify(blob, keyring=signing.Keyring(), window=None) == blob.body


def test_nan_timestamp_is_refused(home: Path) -> None:
    ring = signing.Keyring()
    key_id = ring.add(secrets.token_bytes(32))
    good = signing.sign(b"body", key_id, keyring=ring)
    for stamp in (float("nan"), float("inf")):
        forged = signing.SignedBlob(good.key_id, stamp, good.nonce, good.signature, good.body)
        with pytest.raises(PayloadError, match="finite"):
            signing.verify(forged, keyring=ring)


def _payload(**changes: object) -> str:
    envelope = payload_mod.build_envelope(
        adapter="process", run_id="r:1", task_id="add", attempt=1, func=tasks.add,
        args={"x": 1}, return_path=payload_mod.ReturnPath(url="http://127.0.0.1:9/x"),
        delivery={}, key_id=signing.KEYRING.add(b"payload-age-test-key"), inline_limit=1 << 20,
        store_url=None,
    )
    import msgspec

    return payload_mod.encode_payload(msgspec.structs.replace(envelope, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 0}, "older than this worker accepts"),
        ({"version": 99}, "newer than this worker understands"),
        ({"issued_at": float("nan")}, "not a time"),
        ({"issued_at": time.time() - 8 * 86400}, "over the 604800s"),
        ({"issued_at": time.time() + 3600}, "in the future"),
    ],
)
def test_payload_version_and_age_are_checked(
    home: Path, changes: dict[str, object], message: str
) -> None:
    with pytest.raises(PayloadError, match=message):
        payload_mod.decode_payload(_payload(**changes))


def test_payload_max_age_is_configurable(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = _payload(issued_at=time.time() - 120)
    assert payload_mod.decode_payload(text).run_id == "r:1"
    monkeypatch.setenv(payload_mod.MAX_AGE_ENV, "60")
    with pytest.raises(PayloadError, match="over the 60s"):
        payload_mod.decode_payload(text)
