"""HMAC keys, signed blobs, timestamps and nonces.

Everything that crosses a process boundary and will be unpickled is signed first and
verified before a single byte is decoded: a payload on its way to a worker, an event on its
way back, an outcome stored in a ledger or a drop box. Keys are identified by a short,
non-secret ``key_id`` (a digest of the key) that travels with the blob, so a worker or a
receiver can hold several keys (one per Hub) and pick the right one.

Where a key comes from, in order: ``executor_config.secret`` (a literal, ``env:VAR`` or
``file:/path``), the ``WOVE_ADAPTERS_SECRET`` environment variable (same forms), else a key
generated for this Hub and written 0600 under the per-user data dir so workers on this
host (same user) can read it by ``key_id``. A worker also accepts the keys listed in
``WOVE_ADAPTERS_SECRETS`` (comma-separated specs, current first), so payloads queued before
a rotation still run.

Key ids have one fixed form (16 lower-case hex digits) and are checked before they name a
file; key files and their directory must belong to this user and be writable by no one
else (a planted key would make a worker run its holder's payloads); a key file that is
not a regular file (a FIFO) is refused without blocking.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path

import msgspec

from wove_adapters.core.errors import PayloadError
from wove_adapters.core.paths import data_dir

SECRET_ENV = "WOVE_ADAPTERS_SECRET"
# More keys a worker accepts (comma-separated secret specs, current first): rotation.
SECRETS_ENV = "WOVE_ADAPTERS_SECRETS"
# How long a generated key stays valid (seconds; "0": for ever). Expired key files are
# refused, and removed when this process generates its own key.
KEY_TTL_ENV = "WOVE_ADAPTERS_KEY_TTL"
DEFAULT_KEY_TTL = 30 * 86400.0
DEFAULT_WINDOW_SECONDS = 300.0
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class SignedBlob(msgspec.Struct, frozen=True, array_like=True):
    """A body plus everything needed to check it: who signed, when, once."""

    key_id: str
    timestamp: float
    nonce: str
    signature: bytes
    body: bytes


def key_id_for(key: bytes) -> str:
    return hashlib.sha256(b"wove-adapters-key-id:" + key).hexdigest()[:16]


def check_key_id(key_id: object) -> str:
    """A key id as every signer writes it, or PayloadError: it names a file, so anything
    else (a path, a FIFO's name, 10 MB of text) never reaches the filesystem."""
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        shown = repr(key_id)[:40]
        raise PayloadError(f"malformed key id {shown}: a key id is 16 lower-case hex digits")
    return key_id


class KeyRefusedError(PayloadError):
    """A key exists but must not be used (planted, writable by others, expired): ``verify``
    says so instead of "unknown key", so the operator sees the fix."""


class KeyExpiredError(KeyRefusedError):
    """A generated key past its ``expires`` time (and so a file to prune)."""


def _check_private(path: Path, info: os.stat_result, what: str) -> None:
    """Refuse a key file or keys directory someone else could have written."""
    if info.st_uid != os.getuid():
        raise KeyRefusedError(
            f"the {what} {path} is owned by uid {info.st_uid}, not this user "
            f"({os.getuid()}): a key there may be planted. Remove it, or use a data dir of "
            f"your own (WOVE_ADAPTERS_HOME)."
        )
    if info.st_mode & 0o022:
        raise KeyRefusedError(
            f"the {what} {path} is group- or world-writable (mode "
            f"{stat.S_IMODE(info.st_mode):o}): anyone who can write there can plant keys. "
            f"Fix it with: chmod go-w {path}"
        )


def _keys_dir() -> Path:
    path = data_dir() / "keys"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(path, path.stat(), "keys directory")
    return path


def key_ttl() -> float | None:
    """Seconds a generated key stays valid (``WOVE_ADAPTERS_KEY_TTL``; None: for ever)."""
    raw = os.environ.get(KEY_TTL_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_KEY_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise PayloadError(f"{KEY_TTL_ENV}={raw!r} is not a number of seconds") from None
    if not math.isfinite(ttl) or ttl < 0:
        raise PayloadError(f"{KEY_TTL_ENV}={raw!r} must be a number of seconds >= 0")
    return ttl or None


def read_key_file(path: Path, key_id: str | None = None) -> bytes:
    """A generated key file's key: a private regular file (opened without blocking, so a
    FIFO cannot hang us), holding the key in hex and, optionally, ``expires <epoch>``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise PayloadError(f"cannot open the key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyRefusedError(f"the key file {path} is not a regular file: refused")
        _check_private(path, info, "key file")
        text = handle.read(4096).decode("ascii", "replace")
    lines = text.split()
    try:
        key = bytes.fromhex(lines[0])
    except (IndexError, ValueError):
        raise PayloadError(f"the key file {path} holds no key") from None
    if len(lines) >= 3 and lines[1] == "expires":
        try:
            expires = float(lines[2])
        except ValueError:
            expires = 0.0
        if not expires > time.time():
            raise KeyExpiredError(
                f"the key in {path} expired ({KEY_TTL_ENV}); payloads signed with it are "
                f"refused. Submit the runs again from a caller that is alive."
            )
    if key_id is not None and key_id_for(key) != key_id:
        raise PayloadError(f"The key file {path} does not match its id.")
    return key


def _prune_expired(directory: Path) -> None:
    """Remove expired generated key files (each caller process adds one)."""
    for path in directory.glob("*.key"):
        try:
            read_key_file(path)
        except KeyExpiredError:
            with contextlib.suppress(OSError):
                path.unlink()
        except PayloadError:
            pass  # not ours to remove


def resolve_secret(spec: str | bytes | None, *, option: str | None = None) -> bytes | None:
    """Turn a configured secret (literal, ``env:VAR``, ``file:/path``) into key bytes.
    ``option``: the ``executor_config`` key of another secret read the same way (an API
    token) rather than the signing key, named in the error."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, bytes):
        return spec
    if spec.startswith("env:"):
        var = spec[4:]
        value = os.environ.get(var)
        if not value:
            what = f"executor_config.{option}" if option else "The secret"
            where = "the caller's" if option else "the caller's and every worker's"
            raise PayloadError(
                f"{what} is configured as 'env:{var}' but ${var} is not set. "
                f"Export it in {where} environment."
            )
        return resolve_secret(value, option=option)
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
        self._generated: set[str] = set()  # ids of generated keys (key files), not secrets
        self._lock = threading.Lock()

    def add(self, key: bytes) -> str:
        key_id = key_id_for(key)
        with self._lock:
            self._keys[key_id] = key
        return key_id

    def generate(self) -> str:
        """A fresh key for this Hub, published 0600 for workers on this host, valid for
        ``WOVE_ADAPTERS_KEY_TTL`` seconds (default 30 days)."""
        key = secrets.token_bytes(32)
        key_id = self.add(key)
        self._generated.add(key_id)
        directory = _keys_dir()
        _prune_expired(directory)
        ttl = key_ttl()
        text = key.hex() if ttl is None else f"{key.hex()}\nexpires {time.time() + ttl:.0f}\n"
        path = directory / f"{key_id}.key"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode())
        return key_id

    def get(self, key_id: str, *, load: bool = True) -> bytes:
        """The key with this id. ``load=False`` looks only at keys this process holds
        (the caller's receiver: it checks events of runs it signed, and never touches the
        filesystem on its event loop)."""
        key = self._keys.get(key_id)
        if key is not None:
            return key
        check_key_id(key_id)
        if not load:
            raise PayloadError(f"No key with id {key_id} is held by this process.")
        for spec in [os.environ.get(SECRET_ENV), *_listed(os.environ.get(SECRETS_ENV))]:
            env_key = resolve_secret(spec)
            if env_key is not None and key_id_for(env_key) == key_id:
                return self._remember(env_key)
        path = _keys_dir() / f"{key_id}.key"
        if not path.exists():
            raise PayloadError(
                f"No key with id {key_id} is known to this process. Give the worker the "
                f"caller's secret (set {SECRET_ENV}, or executor_config.secret on both sides; "
                f"{SECRETS_ENV} lists older keys after a rotation); generated keys are only "
                f"readable by workers on the caller's host and user."
            )
        key = read_key_file(path, key_id)
        self._generated.add(key_id)
        return self._remember(key)

    def is_generated(self, key_id: str) -> bool:
        """True for a generated key (this process's, or a readable key file of this
        user); False for a configured secret or an unknown key. May read a key file."""
        if key_id in self._generated:
            return True
        if key_id in self._keys:
            return False
        try:
            self.get(key_id)
        except PayloadError:
            return False
        return key_id in self._generated

    def _remember(self, key: bytes) -> bytes:
        self.add(key)
        return key


# For ``accepts``: a reader with no key of its own (no secret configured): it trusts the
# generated keys of this user, as a caller with a generated key does.
ANY_GENERATED = "any-generated"


def accepts(own: str, other: str, *, keyring: Keyring | None = None) -> bool:
    """Whether a reader whose environment signs with key ``own`` trusts a blob signed
    with ``other``: the same key; or, when ``own`` is a generated key (no secret was
    configured), any generated key of this user (another caller process on this host,
    which is what "no configuration" promises to cover). A configured secret trusts only
    itself, so the holder of one environment's secret cannot resolve another's runs."""
    if other == own:
        return True
    ring = keyring or KEYRING
    generated_reader = own == ANY_GENERATED or ring.is_generated(own)
    return generated_reader and ring.is_generated(other)


def _listed(specs: str | None) -> list[str]:
    return [spec.strip() for spec in (specs or "").split(",") if spec.strip()]


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
    key_id: str | None = None,
    load: bool = True,
) -> bytes:
    """Check signature, then freshness and single use; return the body. Raises PayloadError.

    ``window=None`` skips the freshness check (a stored outcome read back days later);
    the signature is always checked. ``key_id``: the only key this blob may be signed
    with (a run's events and outcome are bound to the key that signed its payload).
    ``load=False``: only keys this process holds (see ``Keyring.get``)."""
    if key_id is not None and blob.key_id != key_id:
        raise PayloadError(
            f"signed with key {str(blob.key_id)[:16]!r}, not with the key of its run ({key_id})"
        )
    if not math.isfinite(blob.timestamp):
        raise PayloadError("the signed timestamp is not a finite number")
    try:
        key = keyring.get(blob.key_id, load=load)
    except KeyRefusedError:
        raise
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


def secret_text(spec: str, *, option: str) -> str:
    """``resolve_secret`` for a secret another system takes as text (a Temporal API key,
    a Kubernetes token)."""
    return (resolve_secret(spec, option=option) or b"").decode()
