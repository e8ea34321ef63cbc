"""wove 2.x's network wire format, shared by our network clients and ``wove-adapters serve``.

wove's ``http``/``https``/``grpc``/``websocket`` executors send a frame as one JSON object
whose Python values travel as base64 cloudpickle in ``callable_pickle``, ``args_pickle``,
``result_pickle``, ``exception_pickle`` and ``error_pickle`` fields; answers are
``{"events": [...]}``. Requests are authenticated by ``NetworkExecutorSecurity``: a bearer
token, or an HMAC-SHA256 over ``wove-v1 / transport / target / timestamp / nonce /
sha256(body)`` in ``X-Wove-*`` headers (gRPC: the same names, lower-cased, as metadata).
This module writes that format byte for byte, so wove's clients talk to our service and
ours to any Wove-compatible service, without importing wove.

Two rules come from our trust boundaries, not from wove:

- Nothing here unpickles on its own initiative: ``decode_frame`` is called only after
  ``Security.verify`` accepted the bytes it came from (a service), or after
  ``Security.verify_response`` accepted the answer (our clients).
- wove's clients trust whatever answers them over TLS. Ours do not: they ask for signed
  answers (``SIGNED_ANSWER_HEADER``), and the service signs each answer with the shared
  secret (signed mode) or the bearer token (bearer mode), bound to the request's nonce, so
  an answer cannot be forged, nor replayed from another request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

GRPC_METHOD = "/wove.network_executor.WorkerService/Send"
# Our server-streaming extension: the run's events as they happen (task_started,
# heartbeats, the terminal event), each message signed. wove's clients never call it.
GRPC_STREAM_METHOD = "/wove_adapters.network.WorkerService/Stream"
HEADERS = {
    "key": "X-Wove-Key",
    "timestamp": "X-Wove-Timestamp",
    "nonce": "X-Wove-Nonce",
    "signature": "X-Wove-Signature",
}
# A request carrying this header (or gRPC metadata key, lower-cased) asks for signed
# answers; wove's own clients never send it and get wove's plain answers.
SIGNED_ANSWER_HEADER = "X-Wove-Adapters-Signed"
PICKLED_FIELDS = ("callable", "args", "result", "exception", "error")
DEFAULT_SKEW = 300.0
# Remembered nonces at most: past this the oldest go first. A flood of fresh signed
# requests needs the secret, so this bounds memory, not what an attacker can do.
NONCE_CAPACITY = 100_000


class AuthError(PermissionError):
    """A request or answer failed authentication. Its message names the check that failed
    and never echoes secrets."""


def encode_frame(frame: Mapping[str, Any]) -> dict[str, Any]:
    payload = dict(frame)
    for name in PICKLED_FIELDS:
        if name in payload:
            raw = cloudpickle.dumps(payload.pop(name))
            payload[f"{name}_pickle"] = base64.b64encode(raw).decode("ascii")
    return payload


def pickled_bytes(payload: Mapping[str, Any], name: str) -> bytes | None:
    """The still-pickled bytes of field ``name`` (its ``{name}_pickle``), or None when
    absent; ``ValueError`` naming the field when it is not base64 text. Unpickles nothing."""
    value = payload.get(f"{name}_pickle")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}_pickle must be base64 text")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{name}_pickle is not valid base64: {exc}") from None


def decode_frame(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Unpickles: call only on authenticated bytes."""
    frame = dict(payload)
    for name in PICKLED_FIELDS:
        raw = pickled_bytes(frame, name)
        if raw is not None:
            del frame[f"{name}_pickle"]
            frame[name] = cloudpickle.loads(raw)
    return frame


def dump_message(frame: Mapping[str, Any]) -> bytes:
    return json.dumps(encode_frame(frame), separators=(",", ":")).encode("utf-8")


def dump_events(events: Iterable[Mapping[str, Any]]) -> bytes:
    body = {"events": [encode_frame(event) for event in events]}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


def load_json(data: bytes | str) -> Any:
    """JSON only: safe before authentication, unlike ``decode_frame``."""
    return json.loads(data)


def raw_events(data: Any) -> list[dict[str, Any]]:
    """The still-pickled event dicts of an answer, in wove's accepted shapes."""
    if isinstance(data, dict) and "events" in data:
        data = data["events"]
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ValueError("a network executor answer must hold a list of event objects")
    return data


def canonical_target(url_or_path: str) -> str:
    """What a signature binds for HTTP and websocket: the path and query, as wove does."""
    parts = urllib.parse.urlsplit(url_or_path)
    if parts.scheme or parts.netloc:
        path = parts.path or "/"
        return f"{path}?{parts.query}" if parts.query else path
    return url_or_path or "/"


def is_loopback(host: str | None) -> bool:
    return host is not None and host.strip("[]").lower() in {"localhost", "127.0.0.1", "::1"}


class _Nonces:
    """Nonces seen within the clock-skew window; a second use is a replay."""

    def __init__(self, window: float) -> None:
        self._window = window
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()  # gRPC handlers may verify from several threads

    def add(self, nonce: str, now: float) -> bool:
        with self._lock:
            while self._seen and (
                next(iter(self._seen.values())) < now - self._window
                or len(self._seen) >= NONCE_CAPACITY
            ):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return False
            self._seen[nonce] = now
            return True


@dataclass
class Security:
    """One side's authentication settings, read from wove's ``security`` option forms:
    ``None``/``"none"``, ``"env:VAR"`` (signed, secret from VAR, key "default"), or a
    table ``{"type": "signed"|"bearer"|"none", "secret"|"secret_env", "key", "token"|
    "token_env", "clock_skew_seconds", "remember_nonces"}``."""

    mode: str = "none"
    secret: bytes = b""
    key: str = "default"
    token: str = ""
    skew: float = DEFAULT_SKEW
    remember_nonces: bool = True
    _nonces: _Nonces = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("none", "signed", "bearer"):
            raise ValueError(
                f"network security type {self.mode!r} is not one of 'signed', 'bearer', 'none'"
            )
        if self.mode == "signed" and not self.secret:
            raise ValueError("signed network security needs a secret (security='env:VAR')")
        if self.mode == "bearer" and not self.token:
            raise ValueError("bearer network security needs a token (token_env='VAR')")
        self._nonces = _Nonces(self.skew)

    @classmethod
    def from_config(cls, value: Any, *, option: str = "security") -> Security:
        if value is None or value == "none":
            return cls()
        if isinstance(value, str):
            if value.startswith("env:") and value[4:]:
                return cls(mode="signed", secret=_env(value[4:], option).encode())
            raise ValueError(
                f"{option} must be 'none', 'env:VARIABLE' or a table; got {value!r}"
            )
        if not isinstance(value, Mapping):
            raise TypeError(f"{option} must be 'none', 'env:VARIABLE' or a table")
        mode = str(value.get("type", "signed"))
        if mode == "signed":
            secret = value.get("secret")
            if secret is None and value.get("secret_env"):
                secret = _env(str(value["secret_env"]), option)
            raw = secret if isinstance(secret, bytes) else str(secret or "").encode()
            return cls(
                mode="signed", secret=raw, key=str(value.get("key", "default")),
                skew=float(value.get("clock_skew_seconds", DEFAULT_SKEW)),
                remember_nonces=bool(value.get("remember_nonces", True)),
            )
        if mode == "bearer":
            token = value.get("token")
            if token is None and value.get("token_env"):
                token = _env(str(value["token_env"]), option)
            return cls(mode="bearer", token=str(token or ""))
        return cls(mode=mode)

    # ------------------------------------------------------------- requests

    def headers_for(self, transport: str, target: str, body: bytes) -> dict[str, str]:
        if self.mode == "bearer":
            return {"Authorization": f"Bearer {self.token}"}
        if self.mode == "none":
            return {}
        return self._signed(self.secret, self.key, transport, target, body)

    def verify(self, headers: Mapping[str, Any], transport: str, target: str, body: bytes) -> None:
        """Raise ``AuthError`` unless the request is authentic (and, signed, fresh and
        not replayed). Runs before any byte of ``body`` is parsed or unpickled."""
        values = {str(k).lower(): str(v) for k, v in headers.items()}
        if self.mode == "none":
            return
        if self.mode == "bearer":
            given = values.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise AuthError("bearer token missing or wrong")
            return
        fields = {name: values.get(header.lower()) for name, header in HEADERS.items()}
        if not all(fields.values()):
            raise AuthError("request is not signed (X-Wove-Key/Timestamp/Nonce/Signature)")
        if fields["key"] != self.key:
            raise AuthError("unknown signing key id")
        try:
            stamp = float(str(fields["timestamp"]))
        except ValueError:
            raise AuthError("timestamp is not a number") from None
        now = time.time()
        if abs(now - stamp) > self.skew:
            raise AuthError(f"timestamp outside the {self.skew:g} s window (stale or clock skew)")
        expected = _digest(
            self.secret, transport, target, str(fields["timestamp"]), str(fields["nonce"]), body
        )
        if not hmac.compare_digest(str(fields["signature"]).encode(), expected.encode()):
            raise AuthError("bad signature")
        if self.remember_nonces and not self._nonces.add(str(fields["nonce"]), now):
            raise AuthError("replayed nonce")

    # -------------------------------------------------------------- answers

    def _answer_secret(self) -> bytes:
        if self.mode == "signed":
            return self.secret
        if self.mode == "bearer":
            return self.token.encode()
        raise AuthError(
            "signed answers need security (signed or bearer): set executor_config.security"
        )

    def sign_answer(self, transport: str, request_nonce: str, body: bytes) -> dict[str, str]:
        """Headers (or metadata) that bind an answer to the request it answers."""
        return self._signed(
            self._answer_secret(), self.key, f"{transport}-answer", request_nonce, body
        )

    def verify_answer(
        self, headers: Mapping[str, Any], transport: str, request_nonce: str, body: bytes
    ) -> None:
        """Raise ``AuthError`` unless the answer was signed for this request. Runs before
        any pickled field of the answer is loaded."""
        values = {str(k).lower(): str(v) for k, v in headers.items()}
        fields = {name: values.get(header.lower()) for name, header in HEADERS.items()}
        if not all(fields.values()):
            raise AuthError("the service's answer is not signed; is it wove-adapters serve?")
        expected = _digest(
            self._answer_secret(), f"{transport}-answer", request_nonce,
            str(fields["timestamp"]), str(fields["nonce"]), body,
        )
        if not hmac.compare_digest(str(fields["signature"]).encode(), expected.encode()):
            raise AuthError("the service's answer has a bad signature")

    @staticmethod
    def _signed(
        secret: bytes, key: str, transport: str, target: str, body: bytes
    ) -> dict[str, str]:
        stamp, nonce = str(int(time.time())), secrets.token_urlsafe(18)
        return {
            HEADERS["key"]: key,
            HEADERS["timestamp"]: stamp,
            HEADERS["nonce"]: nonce,
            HEADERS["signature"]: _digest(secret, transport, target, stamp, nonce, body),
        }


def _digest(secret: bytes, transport: str, target: str, stamp: str, nonce: str, body: bytes) -> str:
    canonical = "\n".join(
        ["wove-v1", transport, target, stamp, nonce, hashlib.sha256(body).hexdigest()]
    )
    return "v1=" + hmac.new(secret, canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def _env(name: str, option: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{option}: environment variable {name!r} is not set or empty")
    return value
