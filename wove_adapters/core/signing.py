"""HMAC keys, signed blobs, timestamps and nonces.

Everything that crosses a process boundary and will be unpickled is signed first and
verified before a single byte is decoded: a payload on its way to a worker, an event on its
way back, an outcome stored in a ledger or a drop box. Keys are identified by a short,
non-secret ``key_id`` (a digest of the key) that travels with the blob, so a worker or a
receiver can hold several keys (one per Hub) and pick the right one.

Where a key comes from, in order: ``executor_config.secret`` (a literal, ``env:VAR`` or
``file:/path``), the ``WOVE_ADAPTERS_SECRET`` environment variable (same forms), else a key
generated for this Hub and written 0600 under the per-user data dir so workers on this
host (same user) can read it by ``key_id``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path

import msgspec

from wove_adapters.core.errors import PayloadError
from wove_adapters.core.paths import data_dir

SECRET_ENV = "WOVE_ADAPTERS_SECRET"
DEFAULT_WINDOW_SECONDS = 300.0


class SignedBlob(msgspec.Struct, frozen=True, array_like=True):
    """A body plus everything needed to check it: who signed, when, once."""

    key_id: str
    timestamp: float
    nonce: str
    signature: bytes
    body: bytes


def key_id_for(key: bytes) -> str:
    return hashlib.sha256(b"wove-adapters-key-id:" + key).hexdigest()[:16]


def _keys_dir() -> Path:
    path = data_dir() / "keys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def resolve_secret(spec: str | bytes | None) -> bytes | None:
    """Turn a configured secret (literal, ``env:VAR``, ``file:/path``) into key bytes."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, bytes):
        return spec
    if spec.startswith("env:"):
        var = spec[4:]
        value = os.environ.get(var)
        if not value:
            raise PayloadError(
                f"The secret is configured as 'env:{var}' but ${var} is not set. "
                f"Export it in the caller and in every worker's environment."
            )
        return resolve_secret(value)
    if spec.startswith("file:"):
        path = Path(spec[5:])
        try:
            return path.read_bytes().strip()
        except OSError as exc:
            raise PayloadError(f"Cannot read the secret file {path}: {exc}") from exc
    return spec.encode()


class Keyring:
    """The keys this process can sign and verify with, by ``key_id``."""

    def __init__(self) -> None:
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def add(self, key: bytes) -> str:
        key_id = key_id_for(key)
        with self._lock:
            self._keys[key_id] = key
        return key_id

    def generate(self) -> str:
        """A fresh key for this Hub, published 0600 for workers on this host."""
        key = secrets.token_bytes(32)
        key_id = self.add(key)
        path = _keys_dir() / f"{key_id}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.hex().encode())
        return key_id

    def get(self, key_id: str) -> bytes:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        env_key = resolve_secret(os.environ.get(SECRET_ENV))
        if env_key is not None and key_id_for(env_key) == key_id:
            return self._remember(env_key)
        path = _keys_dir() / f"{key_id}.key"
        try:
            key = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError):
            raise PayloadError(
                f"No key with id {key_id} is known to this process. Give the worker the "
                f"caller's secret (set {SECRET_ENV}, or executor_config.secret on both sides); "
                f"generated keys are only readable by workers on the caller's host and user."
            ) from None
        if key_id_for(key) != key_id:
            raise PayloadError(f"The key file {path} does not match its id.")
        return self._remember(key)

    def _remember(self, key: bytes) -> bytes:
        self.add(key)
        return key


KEYRING = Keyring()


def sign(body: bytes, key_id: str, *, keyring: Keyring = KEYRING) -> SignedBlob:
    key = keyring.get(key_id)
    timestamp = time.time()
    nonce = secrets.token_hex(12)
    return SignedBlob(key_id, timestamp, nonce, _mac(key, timestamp, nonce, body), body)


def _mac(key: bytes, timestamp: float, nonce: str, body: bytes) -> bytes:
    mac = hmac.new(key, f"{timestamp!r}.{nonce}.".encode(), hashlib.sha256)
    mac.update(body)
    return mac.digest()


class NonceCache:
    """Remembers nonces for the timestamp window, so a replay inside it is refused."""

    def __init__(self, window: float = DEFAULT_WINDOW_SECONDS, limit: int = 1_000_000) -> None:
        self.window = window
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def check_and_add(self, nonce: str, now: float) -> bool:
        with self._lock:
            horizon = now - 2 * self.window
            while self._seen:
                oldest_nonce, seen_at = next(iter(self._seen.items()))
                if seen_at >= horizon and len(self._seen) < self._limit:
                    break
                self._seen.pop(oldest_nonce)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


def verify(
    blob: SignedBlob,
    *,
    keyring: Keyring = KEYRING,
    window: float | None = DEFAULT_WINDOW_SECONDS,
    nonces: NonceCache | None = None,
) -> bytes:
    """Check signature, then freshness and single use; return the body. Raises PayloadError.

    ``window=None`` skips the freshness check (a stored outcome read back days later);
    the signature is always checked."""
    try:
        key = keyring.get(blob.key_id)
    except PayloadError:
        raise PayloadError("signed with an unknown key") from None
    expected = _mac(key, blob.timestamp, blob.nonce, blob.body)
    if not hmac.compare_digest(expected, blob.signature):
        raise PayloadError("bad signature")
    now = time.time()
    if window is not None and abs(now - blob.timestamp) > window:
        raise PayloadError(f"timestamp outside the {window:.0f}s window")
    if nonces is not None and not nonces.check_and_add(blob.nonce, now):
        raise PayloadError("replayed nonce")
    return blob.body


_blob_encoder = msgspec.msgpack.Encoder()
_blob_decoder = msgspec.msgpack.Decoder(SignedBlob)


def encode_blob(blob: SignedBlob) -> bytes:
    return _blob_encoder.encode(blob)


def decode_blob(data: bytes) -> SignedBlob:
    try:
        return _blob_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PayloadError(f"not a signed blob: {exc}") from None
