"""Payload stores: where a body too large to travel inline waits for its worker, and a
result (or pickled exception) too large for the way back waits for its caller.

A reference (``BodyRef``) names the store by URL, the key, and the bytes' sha256, which
``PayloadStore.get`` checks before anything is unpickled. Workers of every backend open
whatever store the caller chose (a directory, Redis, S3), so all three kinds live here,
in ``core``, and each imports its client library only when a store of that kind is
opened: a worker that reads a local file never imports redis or botocore.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib
import os
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from wove_adapters.core.errors import MissingBackendError, PayloadError, redact_url
from wove_adapters.core.paths import default_store_url


class BodyRef(msgspec.Struct, frozen=True, kw_only=True):
    store: str
    key: str
    sha256: str
    size: int


class DigestMismatch(PayloadError):
    """The stored bytes are not the ones the reference's sha256 names: refused."""


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

    def discard(self, keys: Sequence[str]) -> None:
        """Delete stored bodies by key, quietly: one already gone, or a store that fails
        now, leaves an object for the store's own expiry, not an error for the run."""
        for key in keys:
            with contextlib.suppress(Exception):
                self.delete(BodyRef(store=self.url, key=key, sha256="", size=0))

    def put(self, key: str, data: bytes) -> BodyRef:
        self._put(key, data)
        return BodyRef(
            store=self.url, key=key, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
        )

    def get(self, ref: BodyRef, *, what: str = "payload body") -> bytes:
        """The bytes ``ref`` names, only if they match its sha256 (``what`` names them in
        the error: a payload body, a task's result)."""
        try:
            data = self._get(ref.key)
        except (OSError, KeyError) as exc:
            raise PayloadError(
                f"{what} {ref.key} is missing from {redact_url(self.url)}: {exc}"
            ) from None
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise DigestMismatch(f"{what} {ref.key} does not match its sha256; refused")
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
        write_private(tmp, data)
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


class S3Store(PayloadStore):
    """``s3://bucket/prefix?endpoint_url=http://127.0.0.1:5000&region=us-east-1``: payloads
    in S3 for jobs on other machines. Credentials come from boto3's usual chain (the job
    role inside AWS Batch). Sync on purpose, like every store; the caller uses a thread."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlparse(url)
        if not parsed.netloc:
            raise ValueError(f"S3 payload store URL {url!r} names no bucket: use s3://BUCKET/PREFIX")
        query = urllib.parse.parse_qs(parsed.query)
        self.url = url
        self.bucket = parsed.netloc
        prefix = parsed.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = query.get("endpoint_url", [None])[0]
        self.region = query.get("region", [None])[0]
        self.profile = query.get("profile", [None])[0]
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:  # boto3 sessions are not thread-safe; clients are
                if self._client is None:
                    # botocore directly: a job's worker skips importing boto3 and
                    # s3transfer (~30% of its S3 start-up cost).
                    try:
                        import botocore.session
                        from botocore.config import Config
                    except ImportError:
                        raise MissingBackendError("s3 payload store", "botocore", "aws") from None
                    session = botocore.session.Session(profile=self.profile)
                    self._client = session.create_client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        config=Config(max_pool_connections=32, retries={"mode": "standard"}),
                    )
        return self._client

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise PayloadError(f"bad payload key {key!r}")
        return self.prefix + key

    def _put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except self.client.exceptions.NoSuchKey:
            raise KeyError(f"s3://{self.bucket}/{self._key(key)}") from None
        return bytes(response["Body"].read())

    def delete(self, ref: BodyRef) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(ref.key))


# Scheme -> store: a class here, or "module:Class" registered by a third party and
# imported on first use.
_STORE_KINDS: dict[str, Callable[[str], PayloadStore] | str] = {
    "file": FileStore,
    "redis": RedisStore,
    "rediss": RedisStore,
    "s3": S3Store,
}
_stores: dict[str, PayloadStore] = {}


def register_store(scheme: str, dotted: str) -> None:
    """Let a third party add a store kind (``"module:Class"``, imported on first use)."""
    _STORE_KINDS[scheme] = dotted


def open_store(url: str | None) -> PayloadStore:
    url = url or default_store_url()
    store = _stores.get(url)
    if store is None:
        scheme = urllib.parse.urlparse(url).scheme
        kind = _STORE_KINDS.get(scheme)
        if kind is None:
            known = ", ".join(sorted(_STORE_KINDS))
            raise ValueError(f"Unknown payload store {url!r}; supported schemes: {known}")
        if isinstance(kind, str):
            module, _, name = kind.partition(":")
            kind = getattr(importlib.import_module(module), name)
        store = kind(url)
        _stores[url] = store
    return store


def write_private(path: Path, data: bytes | str) -> None:
    """Write a file only its owner can read: it carries a signed task or its result."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def probe(url: str) -> None:
    """Write, read back and delete one small body at the store ``url`` (``doctor``)."""
    store = open_store(url)
    ref = store.put(f"doctor-{os.urandom(8).hex()}", b"wove-adapters doctor")
    store.get(ref)
    store.delete(ref)
