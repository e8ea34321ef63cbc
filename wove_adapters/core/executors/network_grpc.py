"""``grpc``: wove's gRPC network executor, client side, with our delivery policies.

Runs go through our server-streaming method (``netwire.GRPC_STREAM_METHOD``): the service
sends the run's events as they happen, each message a signed ``{"body", "sig"}`` object,
so task_started and heartbeats arrive while the task runs and a stream that breaks or
ends early is a lost run (see ``network``). Cancel requests use wove's unary method
(``executor_config.method``, wove's default path). ``grpcio`` is imported when the
environment starts; without it the start fails naming ``pip install
'wove-adapters[grpc]'``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from wove_adapters.core import netwire
from wove_adapters.core.errors import MissingBackendError, PayloadError
from wove_adapters.core.executors.network import (
    CANCEL_TIMEOUT,
    CONNECT_TIMEOUT,
    MAX_MESSAGE,
    AnswerError,
    GrpcOptions,
    NetworkTransport,
    _auth_nonce,
    _Flight,
    answer_events,
    cancel_frame,
    is_loopback_target,
    signed_events,
)
from wove_adapters.core.transport import RunAttempt

# The service sends its first message when the run starts, which may be after a wait in
# its queue: a call that has not failed this soon after a ready channel counts as taken
# (a refusal comes at once; a later failure is then reported as the run's event).
ACCEPT_GRACE = 0.3


def _identity(value: bytes) -> bytes:
    return value


class GrpcTransport(NetworkTransport):
    name = "grpc"
    config_struct = GrpcOptions
    address_key = "target"

    def __init__(self) -> None:
        super().__init__()
        self._grpc: Any = None
        self._channel: Any = None
        self._stream: Any = None
        self._unary: Any = None
        self._method = netwire.GRPC_METHOD
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._timeout = CANCEL_TIMEOUT
        self._connect_timeout = CONNECT_TIMEOUT

    async def _open(self, config: dict[str, Any]) -> None:
        try:
            import grpc
            import grpc.aio
        except ImportError as exc:
            raise MissingBackendError("grpc", "grpc", "grpc") from exc
        self._grpc = grpc
        target = config.get("target")
        if not isinstance(target, str) or not target:
            raise self._refuse("target", "executor_config.target must be the service's "
                               "host:port, e.g. 'workers.example:50051'")
        method = config.get("method") or netwire.GRPC_METHOD
        if not method.startswith("/"):
            raise self._refuse("method", f"executor_config.method must be a full gRPC method "
                               f"path such as {netwire.GRPC_METHOD!r}, not {method!r}")
        self._method, self._address = method, target
        secure = bool(config.get("secure"))
        self._check_reach(
            key="secure", shown=target, loopback=is_loopback_target(target), encrypted=secure,
            tls_hint="set executor_config.secure=True (with root_certificates or ca_file) "
            "and serve with --transport grpc and TLS",
        )
        self._metadata = _metadata(config.get("metadata"))
        if config.get("timeout") is not None:
            self._timeout = self._connect_timeout = float(config["timeout"])
        options = [
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 200),
        ]
        if secure:
            tls = await asyncio.to_thread(self._tls, config)  # reads certificate files
            credentials = grpc.ssl_channel_credentials(**tls)
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            files = sorted(k for k in ("ca_file", "cert_file", "key_file", "root_certificates")
                           if config.get(k))
            if files:
                raise self._refuse(files[0], f"executor_config.{files[0]} is set but "
                                   "executor_config.secure is not: the channel would not "
                                   "be encrypted; set secure=True")
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stream = self._channel.unary_stream(
            netwire.GRPC_STREAM_METHOD, request_serializer=_identity,
            response_deserializer=_identity,
        )
        self._unary = self._channel.unary_unary(
            self._method, request_serializer=_identity, response_deserializer=_identity
        )

    def _tls(self, config: dict[str, Any]) -> dict[str, bytes | None]:
        """``ssl_channel_credentials`` arguments: roots from ``root_certificates`` (PEM
        text, wove's key) or ``ca_file``, a client certificate from the files."""

        def read(key: str) -> bytes | None:
            path = config.get(key)
            if not path:
                return None
            try:
                return Path(str(path)).read_bytes()
            except OSError as exc:
                raise self._refuse(key, f"executor_config.{key} could not be read: {exc}") \
                    from None

        roots = config.get("root_certificates")
        if isinstance(roots, str):
            roots = roots.encode("utf-8")
        if config.get("key_file") and not config.get("cert_file"):
            raise self._refuse("key_file", "executor_config.key_file needs cert_file")
        return {
            "root_certificates": roots or read("ca_file"),
            "private_key": read("key_file"),
            "certificate_chain": read("cert_file"),
        }

    def _call_metadata(self, target: str, body: bytes) -> tuple[tuple[tuple[str, str], ...], str]:
        auth, nonce = _auth_nonce(self._security, self._security.headers_for("grpc", target, body))
        pairs = (
            *self._metadata,
            (netwire.SIGNED_ANSWER_HEADER.lower(), "1"),
            *((key.lower(), value) for key, value in auth.items()),
        )
        return pairs, nonce

    async def _submit(self, run: RunAttempt) -> None:
        body = netwire.dump_message(run.task_frame())
        if len(body) > MAX_MESSAGE:
            raise PayloadError(f"{self.where}: a run_task of {len(body)} bytes is too large")
        metadata, nonce = self._call_metadata(netwire.GRPC_STREAM_METHOD, body)
        await self._ready()
        flight = self._new_flight(run)
        flight.task = asyncio.get_running_loop().create_task(
            self._follow(flight, body, metadata, nonce)
        )
        await self._until_accepted(flight)

    async def _ready(self) -> None:
        """A connected channel (at once when it already is), else the service is down."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self._connect_timeout)
        except asyncio.TimeoutError:
            state = self._channel.get_state(try_to_connect=False)
            raise self._unavailable(
                f"no connection within {self._connect_timeout:g}s (channel {state.name})"
            ) from None

    async def _follow(
        self, flight: _Flight, body: bytes, metadata: tuple[tuple[str, str], ...], nonce: str
    ) -> None:
        grpc = self._grpc
        taken = asyncio.get_running_loop().call_later(ACCEPT_GRACE, flight.accept)
        resent = False
        try:
            while True:
                call = self._stream(body, metadata=metadata)
                try:
                    while not flight.finished:
                        message = await call.read()
                        if message is grpc.aio.EOF:
                            break
                        flight.accept()
                        self._deliver_all(
                            flight, signed_events(self._security, "grpc", nonce, message)
                        )
                    break
                except grpc.aio.AioRpcError as exc:
                    # A connection that died under us (a requeue right after a cut) fails
                    # the next call before it is taken. Sent again once on a fresh
                    # connection, only with an idempotency key: if the first did reach the
                    # service, the service attaches the second to it.
                    if (resent or flight.accepted.done() or flight.run.idempotency_key is None
                            or exc.code() != grpc.StatusCode.UNAVAILABLE):
                        raise
                    resent = True
                    # Signed afresh: the first request may have reached the service, which
                    # would refuse the same nonce as a replay before it could attach.
                    metadata, nonce = self._call_metadata(netwire.GRPC_STREAM_METHOD, body)
                    await self._ready()
        except asyncio.CancelledError:
            call.cancel()
            raise
        except AnswerError as exc:
            call.cancel()
            self._fail(flight, AnswerError(f"{self.where}: {self._address}: {exc}"))
            return
        except grpc.aio.AioRpcError as exc:
            self._rpc_failed(flight, exc)
            return
        except Exception as exc:  # _ready: no connection within the bound
            self._fail(flight, exc)
            return
        finally:
            taken.cancel()
        if flight.finished:
            call.cancel()
            return
        self._lost(flight, f"the worker service at {self._address} ended the run's stream "
                           "without its outcome (was it stopped or restarted?)")

    def _rpc_failed(self, flight: _Flight, exc: Any) -> None:
        code = exc.code()
        status = self._grpc.StatusCode
        text = f"{code.name}: {exc.details()}"
        if code in (status.UNAUTHENTICATED, status.PERMISSION_DENIED):
            self._fail(flight, self._refused(code.name, str(exc.details() or "")))
        elif code == status.UNIMPLEMENTED:
            self._fail(flight, PayloadError(
                f"{self.where}: the service at {self._address} does not offer "
                f"{netwire.GRPC_STREAM_METHOD} ({text}): is it wove-adapters serve "
                "--transport grpc?"))
        elif code in (status.INVALID_ARGUMENT, status.RESOURCE_EXHAUSTED):
            self._fail(flight, PayloadError(
                f"{self.where}: the service at {self._address} refused the run ({text})"))
        else:
            self._lost(flight, f"the gRPC stream to the worker service at {self._address} "
                               f"broke before the run's outcome ({text})")

    async def _cancel(self, run: RunAttempt, mode: str) -> list[dict[str, Any]]:
        grpc = self._grpc
        body = netwire.dump_message(cancel_frame(run, mode))
        metadata, nonce = self._call_metadata(self._method, body)
        call = self._unary(body, metadata=metadata, timeout=self._timeout)
        try:
            answer = await call
            headers = {**dict(await call.initial_metadata() or ()),
                       **dict(await call.trailing_metadata() or ())}
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                raise self._refused(code.name, str(exc.details() or "")) from None
            raise self._unavailable(f"{code.name}: {exc.details()}", exc) from exc
        return answer_events(self._security, "grpc", nonce, headers, bytes(answer or b""))

    async def aclose(self) -> None:
        await self._stop_flights()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def _metadata(value: Any) -> tuple[tuple[str, str], ...]:
    """wove's ``metadata`` forms: a table or pairs; keys lower-cased, as gRPC requires."""
    if not value:
        return ()
    pairs = value.items() if isinstance(value, dict) else value
    return tuple((str(key).lower(), str(item)) for key, item in pairs)

