"""Build, sign, encode and (when large) offload the payload a backend carries to a worker.

The payload is a versioned envelope; its ``body`` is cloudpickle of ``(callable, args)``.
Backends limit what they carry inline (environment variables, command lines, API fields),
so a body above the adapter's inline limit goes to a payload store and the envelope
carries a reference with the body's sha256, which the worker checks before unpickling.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import importlib
import os
import time
import urllib.parse
from pathlib import Path
from typing import Any, Final

import msgspec

from wove_adapters.callbacks import signing
from wove_adapters.core.errors import MissingDispatchFeatureError, PayloadError

PAYLOAD_VERSION: Final = 1
PAYLOAD_PREFIX: Final = "wove1."


class ReturnPath(msgspec.Struct, frozen=True, kw_only=True):
    """Where the worker sends its events. ``http``: POST to ``url``; ``redis``: push to
    ``key`` on ``url`` (a drop box the caller reads)."""

    kind: str = "http"
    url: str = ""
    key: str = ""


class BodyRef(msgspec.Struct, frozen=True, kw_only=True):
    store: str
    key: str
    sha256: str
    size: int


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    version: int = PAYLOAD_VERSION
    adapter: str
    run_id: str
    task_id: str
    attempt: int = 1
    return_path: ReturnPath
    delivery: dict[str, Any] = {}
    body: bytes | None = None
    body_ref: BodyRef | None = None
    key_id: str = ""
    issued_at: float = 0.0
    ledger: str | None = None
    heartbeat_seconds: float | None = None
    # How long the worker keeps trying to hand the outcome back in the background
    # (executor_config worker_retry_seconds / worker_retry_attempts /
    # worker_exit_flush_seconds); None: the worker's own defaults (see callbacks.sender).
    retry_seconds: float | None = None
    retry_attempts: int | None = None
    exit_flush_seconds: float | None = None
    # The caller's environment name: a worker that must create its run's ledger record
    # (the claim never reached the ledger) files it there.
    environment: str = ""


_env_encoder = msgspec.msgpack.Encoder()
_env_decoder = msgspec.msgpack.Decoder(Envelope)


def cloudpickle_module() -> Any:
    try:
        return importlib.import_module("cloudpickle")
    except ImportError:
        raise MissingDispatchFeatureError("tasks are pickled to reach another process") from None


def dumps(value: Any) -> bytes:
    return bytes(cloudpickle_module().dumps(value))


def loads(data: bytes) -> Any:
    return cloudpickle_module().loads(data)


def encode_payload(envelope: Envelope) -> str:
    """Sign the envelope and return it as a compact ASCII string (safe in env vars)."""
    blob = signing.sign(_env_encoder.encode(envelope), envelope.key_id)
    return PAYLOAD_PREFIX + base64.urlsafe_b64encode(signing.encode_blob(blob)).decode("ascii")


def decode_payload(text: str | bytes) -> Envelope:
    """Verify, then decode. Nothing is unpickled here; see ``load_body``."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if not text.startswith(PAYLOAD_PREFIX):
        raise PayloadError(
            "not a wove-adapters payload (it must start with 'wove1.'); an unsigned or "
            "foreign payload is refused"
        )
    try:
        raw = base64.urlsafe_b64decode(text[len(PAYLOAD_PREFIX) :].encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise PayloadError(f"payload is not valid base64: {exc}") from None
    body = signing.verify(signing.decode_blob(raw), window=None)
    try:
        envelope = _env_decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise PayloadError(f"payload envelope is malformed: {exc}") from None
    if envelope.version > PAYLOAD_VERSION:
        raise PayloadError(
            f"payload version {envelope.version} is newer than this worker understands "
            f"({PAYLOAD_VERSION}); upgrade wove-adapters on the worker"
        )
    return envelope


def load_body(envelope: Envelope) -> tuple[Any, dict[str, Any]]:
    """Fetch (if by reference), check the digest, and unpickle ``(callable, args)``."""
    if envelope.body is not None:
        data = envelope.body
    elif envelope.body_ref is not None:
        data = open_store(envelope.body_ref.store).get(envelope.body_ref)
    else:
        raise PayloadError("payload has neither a body nor a body reference")
    func, args = loads(data)
    return func, dict(args)


# ---------------------------------------------------------------- stores


class PayloadStore(abc.ABC):
    """Holds bodies too large to travel inline. Sync on purpose: workers call it from
    plain code; the caller runs it in a thread."""

    url: str

    @abc.abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def delete(self, ref: BodyRef) -> None: ...

    def put(self, key: str, data: bytes) -> BodyRef:
        self._put(key, data)
        return BodyRef(
            store=self.url, key=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )

    def get(self, ref: BodyRef) -> bytes:
        try:
            data = self._get(ref.key)
        except (OSError, KeyError) as exc:
            raise PayloadError(
                f"payload body {ref.key} is missing from {self.url}: {exc}"
            ) from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise PayloadError(f"payload body {ref.key} does not match its sha256; refused")
        return data


class FileStore(PayloadStore):
    """A directory (local or shared, e.g. NFS for Slurm)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(urllib.parse.urlparse(url).path)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _path(self, key: str) -> Path:
        if "/" in key or key.startswith("."):
            raise PayloadError(f"bad payload key {key!r}")
        return self.root / key

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)

    def _get(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def delete(self, ref: BodyRef) -> None:
        try:
            self._path(ref.key).unlink()
        except FileNotFoundError:
            pass


class RedisStore(PayloadStore):
    """``redis://host:port/db?prefix=...&ttl=86400``: for workers on other hosts."""

    def __init__(self, url: str) -> None:
        try:
            import redis
        except ImportError:
            from wove_adapters.core.errors import MissingBackendError

            raise MissingBackendError("redis payload store", "redis", "redis") from None
        self.url = url
        parsed = urllib.parse.urlparse(url)
        query = urllib.parse.parse_qs(parsed.query)
        self.prefix = query.get("prefix", ["wove-adapters:payload:"])[0]
        self.ttl = int(query.get("ttl", ["86400"])[0])
        base = urllib.parse.urlunparse(parsed._replace(query=""))
        self._client = redis.Redis.from_url(base)

    def _put(self, key: str, data: bytes) -> None:
        self._client.set(self.prefix + key, data, ex=self.ttl)

    def _get(self, key: str) -> bytes:
        data = self._client.get(self.prefix + key)
        if data is None:
            raise KeyError(key)
        return bytes(data)  # type: ignore[arg-type]

    def delete(self, ref: BodyRef) -> None:
        self._client.delete(self.prefix + ref.key)


_STORE_KINDS: dict[str, str] = {
    "file": "wove_adapters.callbacks.payload:FileStore",
    "redis": "wove_adapters.callbacks.payload:RedisStore",
    "rediss": "wove_adapters.callbacks.payload:RedisStore",
    # A string, imported on first use: workers open s3:// references without ever
    # importing the AWS Batch adapter.
    "s3": "wove_adapters.adapters.aws_batch:S3Store",
}
_stores: dict[str, PayloadStore] = {}


def register_store(scheme: str, dotted: str) -> None:
    """Let an adapter add a store kind (S3 arrives with AWS Batch)."""
    _STORE_KINDS[scheme] = dotted


def open_store(url: str | None) -> PayloadStore:
    from wove_adapters.core.paths import default_store_url

    url = url or default_store_url()
    store = _stores.get(url)
    if store is None:
        scheme = urllib.parse.urlparse(url).scheme
        dotted = _STORE_KINDS.get(scheme)
        if dotted is None:
            known = ", ".join(sorted(_STORE_KINDS))
            raise ValueError(f"Unknown payload store {url!r}; supported schemes: {known}")
        module, _, name = dotted.partition(":")
        store = getattr(importlib.import_module(module), name)(url)
        _stores[url] = store
    return store


def build_envelope(
    *,
    adapter: str,
    run_id: str,
    task_id: str,
    attempt: int,
    func: Any,
    args: dict[str, Any],
    return_path: ReturnPath,
    delivery: dict[str, Any],
    key_id: str,
    inline_limit: int,
    store_url: str | None,
    ledger: str | None = None,
    heartbeat_seconds: float | None = None,
    body: bytes | None = None,
    retry_seconds: float | None = None,
    retry_attempts: int | None = None,
    exit_flush_seconds: float | None = None,
    environment: str = "",
) -> Envelope:
    """Pickle the task and place its body inline or in the store (blocking: call in a thread
    when the body may be large)."""
    if body is None:
        body = dumps((func, args))
    body_ref = None
    if len(body) > inline_limit:
        body_ref = open_store(store_url).put(f"{run_id.replace(':', '_')}-{attempt}", body)
        body = None
    return Envelope(
        adapter=adapter,
        run_id=run_id,
        task_id=task_id,
        attempt=attempt,
        return_path=return_path,
        delivery={k: v for k, v in delivery.items() if isinstance(v, (str, int, float, bool))},
        body=body,
        body_ref=body_ref,
        key_id=key_id,
        issued_at=time.time(),
        ledger=ledger,
        heartbeat_seconds=heartbeat_seconds,
        retry_seconds=retry_seconds,
        retry_attempts=retry_attempts,
        exit_flush_seconds=exit_flush_seconds,
        environment=environment,
    )
