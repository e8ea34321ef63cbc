"""Build, sign, encode and (when large) offload the payload a backend carries to a worker.

The payload is a versioned envelope; its ``body`` is cloudpickle of ``(callable, args)``.
Backends limit what they carry inline (environment variables, command lines, API fields),
so a body above the adapter's inline limit goes to a payload store and the envelope
carries a reference with the body's sha256, which the worker checks before unpickling
(the stores are in ``core.stores``). The way back is limited too (the receiver takes 16
MiB per request, the drop box 64 MiB per entry), so the envelope also names the store
where the worker puts a large result (``result_store``; see worker.runner).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import math
import os
import pickle
import socket
import time
from typing import Any, Final

import msgspec

from wove_adapters.core import signing
from wove_adapters.core.errors import (
    MissingDispatchFeatureError,
    PayloadError,
    strip_credentials,
)
from wove_adapters.core.paths import default_store_url
from wove_adapters.core.stores import BodyRef, open_store

PAYLOAD_VERSION: Final = 1
OLDEST_PAYLOAD_VERSION: Final = 1
# How old (seconds since it was signed) a payload may be when a worker takes it; "0": no
# limit. A week by default: longer than any queue should hold a job, short enough that a
# payload copied out of a broker stops working.
MAX_AGE_ENV: Final = "WOVE_ADAPTERS_PAYLOAD_MAX_AGE"
DEFAULT_MAX_AGE: Final = 7 * 86400.0
# Clocks may disagree this much before a payload "from the future" is refused.
CLOCK_SKEW: Final = 300.0
PAYLOAD_PREFIX: Final = "wove1."
# A chunk: several payloads that travel as one backend message (a mapped call packed K
# runs to a job). Each piece is a whole signed payload, verified on its own; the chunk
# itself is not signed, since it adds nothing a piece does not carry (a piece moved
# into another chunk is the same run, as a copied job is).
CHUNK_PREFIX: Final = "wove1chunk:"
CHUNK_SEPARATOR: Final = "~"  # outside the urlsafe base64 alphabet of a payload


class ReturnPath(msgspec.Struct, frozen=True, kw_only=True):
    """Where the worker sends its events. ``http``: POST to ``url``; ``redis``: push to
    ``key`` on ``url`` (a drop box the caller reads)."""

    kind: str = "http"
    url: str = ""
    key: str = ""


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
    # worker_exit_flush_seconds); None: the worker's own defaults (see worker.sender).
    retry_seconds: float | None = None
    retry_attempts: int | None = None
    exit_flush_seconds: float | None = None
    # The caller's environment name: a worker that must create its run's ledger record
    # (the claim never reached the ledger) files it there.
    environment: str = ""
    # Where the worker may put a result (or pickled exception) too large for the way back:
    # the caller's payload store. None (a caller that predates it, or a native return
    # path): results travel inline. ``result_store_host`` set: the store is the caller's
    # default, a directory on that host, so a worker elsewhere (which would write to a
    # directory of its own) sends its result inline instead.
    result_store: str | None = None
    result_store_host: str = ""
    # The W3C trace context (``traceparent``, ``tracestate``) of the caller's attempt
    # span, when tracing is on (wove_adapters.observability.tracing): the worker's span
    # is its child. None: not traced. Signed with the rest; a worker that predates it
    # ignores it (msgspec skips unknown fields), so PAYLOAD_VERSION stays 1.
    trace: dict[str, str] | None = None

    @property
    def outcome_ident(self) -> dict[str, Any]:
        """The fields every terminal event of this run carries (its key included)."""
        key = self.delivery.get("delivery_idempotency_key")
        return {"run_id": self.run_id, "task_id": self.task_id, "attempt": self.attempt,
                "idempotency_key": None if key is None else str(key)}


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


class _Pickled:
    """A callable whose pickle is already made: pickling it writes those bytes (and the
    loader's name) instead of pickling the callable again, and unpickling gives the
    callable back, so workers see no difference."""

    __slots__ = ("data", "func")

    def __init__(self, func: Any, data: bytes) -> None:
        self.func, self.data = func, data

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return loads, (self.data,)


# Each task callable's pickle, made once per loop iteration: a mapped call's runs, all
# submitted in one iteration, carry the same function (a closure or lambda is pickled by
# value, at a cost that can exceed the rest of a short run's work). Not longer: a closure
# pickled by value carries its cells' and globals' values as they are now, and a later
# call must see later values. Keyed by id, the function kept alive until cleared.
_PICKLED: dict[int, tuple[Any, bytes]] = {}


def _pickled_once(inner: Any) -> bytes:
    found = _PICKLED.get(id(inner))
    if found is not None and found[0] is inner:
        return found[1]
    data = dumps(inner)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return data  # not on a loop (a thread building a large body): nothing to share
    if not _PICKLED:
        loop.call_soon(_PICKLED.clear)
    _PICKLED[id(inner)] = (inner, data)
    return data


# Argument types the standard pickler writes exactly as cloudpickle would: by value, with
# no reference to a module the worker might lack. Exact types only: a subclass (an enum of
# ``__main__``, say) is pickled by reference by one and by value by the other.
_PLAIN: Final = frozenset({int, float, str, bytes, bool, type(None), complex})
_CONTAINERS: Final = frozenset({tuple, list, set, frozenset})
_PLAIN_BUDGET = 256  # values looked at before cloudpickle is simply used


def _plain(values: list[Any]) -> bool:
    """True when every value (containers walked) is plain data, within the budget."""
    budget = _PLAIN_BUDGET
    while values:
        budget -= 1
        if budget < 0:
            return False
        value = values.pop()
        kind = type(value)
        if kind in _PLAIN:
            continue
        if kind in _CONTAINERS:
            values.extend(value)
        elif kind is dict:
            values.extend(value.keys())
            values.extend(value.values())
        else:
            return False
    return True


def task_body(func: Any, args: dict[str, Any]) -> bytes:
    """The pickle of ``(func, args)`` a payload carries; ``func`` itself (or the function
    a ``functools.partial`` wraps, as ``Hub.map`` makes per item) is pickled once per loop
    iteration (``_PICKLED``) and its bytes reused. Arguments that are plain data go
    through the standard pickler (the same bytes' meaning, several times faster than
    cloudpickle's pure-Python reducer hooks on a short run's ``(x,)``)."""
    partial = isinstance(func, functools.partial)
    inner = func.func if partial else func
    ref = _Pickled(inner, _pickled_once(inner))
    body = (functools.partial(ref, *func.args, **func.keywords), args) if partial else (ref, args)
    if _plain([*func.args, *func.keywords.values(), *args.values()] if partial
              else [*args.values()]):
        return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)
    return dumps(body)


def encode_payload(envelope: Envelope) -> str:
    """Sign the envelope and return it as a compact ASCII string (safe in env vars)."""
    blob = signing.sign(_env_encoder.encode(envelope), envelope.key_id)
    return PAYLOAD_PREFIX + base64.urlsafe_b64encode(signing.encode_blob(blob)).decode("ascii")


def encode_chunk(payloads: list[str]) -> str:
    """One backend message for several signed payloads (see ``CHUNK_PREFIX``)."""
    return CHUNK_PREFIX + CHUNK_SEPARATOR.join(payloads)


def is_chunk(text: str | bytes) -> bool:
    prefix = CHUNK_PREFIX.encode() if isinstance(text, bytes) else CHUNK_PREFIX
    return text.startswith(prefix)  # type: ignore[arg-type]


def split_chunk(text: str | bytes) -> list[str]:
    """The payloads of a chunk, each still to be verified (``decode_payload``)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip()
    if not text.startswith(CHUNK_PREFIX):
        raise PayloadError("not a wove-adapters chunk (it must start with 'wove1chunk:')")
    return [piece for piece in text[len(CHUNK_PREFIX):].split(CHUNK_SEPARATOR) if piece]


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
    if envelope.version < OLDEST_PAYLOAD_VERSION:
        raise PayloadError(
            f"payload version {envelope.version} is older than this worker accepts "
            f"({OLDEST_PAYLOAD_VERSION}..{PAYLOAD_VERSION})"
        )
    check_age(envelope.issued_at)
    return envelope


def check_age(issued_at: float, *, now: float | None = None) -> None:
    """A payload is taken only within ``WOVE_ADAPTERS_PAYLOAD_MAX_AGE`` of being signed."""
    if not math.isfinite(issued_at) or issued_at <= 0:
        raise PayloadError(f"payload issued_at {issued_at!r} is not a time")
    raw = os.environ.get(MAX_AGE_ENV, "").strip()
    try:
        max_age = float(raw) if raw else DEFAULT_MAX_AGE
    except ValueError:
        raise PayloadError(f"{MAX_AGE_ENV}={raw!r} is not a number of seconds") from None
    now = time.time() if now is None else now
    if issued_at > now + CLOCK_SKEW:
        raise PayloadError(
            f"payload issued {issued_at - now:.0f}s in the future: the caller's and the "
            f"worker's clocks disagree; synchronise them (NTP)"
        )
    if max_age > 0 and now - issued_at > max_age:
        raise PayloadError(
            f"payload is {now - issued_at:.0f}s old, over the {max_age:.0f}s this worker "
            f"accepts ({MAX_AGE_ENV}); submit the run again"
        )


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
    trace: dict[str, str] | None = None,
) -> Envelope:
    """Pickle the task and place its body inline or in the store (blocking: call in a thread
    when the body may be large)."""
    if body is None:
        body = task_body(func, args)
    body_ref = None
    if len(body) > inline_limit:
        body_ref = open_store(store_url).put(store_key(run_id, attempt), body)
        body = None
    # The backend hands a native result back itself (no receiver limits it).
    by_reference = return_path.kind != "native"
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
        # No secret rides in a payload: workers add the ledger credentials themselves.
        ledger=strip_credentials(ledger),
        heartbeat_seconds=heartbeat_seconds,
        retry_seconds=retry_seconds,
        retry_attempts=retry_attempts,
        exit_flush_seconds=exit_flush_seconds,
        environment=environment,
        result_store=(store_url or default_store_url()) if by_reference else None,
        result_store_host="" if store_url or not by_reference else _hostname(),
        trace=trace,
    )


def store_key(run_id: str, attempt: int) -> str:
    """The store key of a run attempt's body; its result's key starts with it too."""
    return f"{run_id.replace(':', '_')}-{attempt}"


@functools.cache
def _hostname() -> str:
    return socket.gethostname()
