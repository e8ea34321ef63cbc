"""The gRPC front of ``wove-adapters serve`` (grpcio's asyncio server).

Two methods, both bytes in and bytes out through generic handlers (no generated code,
nothing deserialized before authentication):

- ``netwire.GRPC_METHOD`` (``/wove.network_executor.WorkerService/Send``), unary: wove's
  ``GrpcEnvironmentExecutor`` sends one JSON frame and gets ``{"events": [...]}`` back when
  the run ends. A request that asks for signed answers (``x-wove-adapters-signed``
  metadata) gets the answer's ``x-wove-*`` signature in its initial metadata.
- ``netwire.GRPC_STREAM_METHOD``, unary-stream, our extension: the run's events as they
  happen (``task_started``, heartbeats, the terminal event), each message the
  ``{"body", "sig"}`` object of ``serve.signed_message``.

Authentication is the metadata (lower-cased ``x-wove-*``, or ``authorization``) checked
against the raw request bytes, with the method path as the signed target; a refusal is
``UNAUTHENTICATED``. A full queue is ``RESOURCE_EXHAUSTED``, a draining service
``UNAVAILABLE``, a malformed frame ``INVALID_ARGUMENT``.

``grpc`` is imported only here, so the rest of the package works without the extra.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from wove_adapters.core import netwire
from wove_adapters.core.netwire import AuthError
from wove_adapters.worker.serve import (
    GRPC_MISSING,
    BadFrame,
    Listener,
    ServeConfig,
    ServeConfigError,
    Service,
    Unavailable,
    _extension_nonce,
    events_body,
    signed_message,
)

try:
    import grpc
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ServeConfigError(GRPC_MISSING) from exc


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.strip("/").rpartition("/")
    return service, name


def _credentials(config: ServeConfig) -> Any:
    """TLS for the secure port (read once at start, off the event loop)."""
    with open(str(config.tls_key), "rb") as key_file, open(str(config.tls_cert), "rb") as cert:
        pair = (key_file.read(), cert.read())
    roots = None
    if config.tls_client_ca:
        with open(config.tls_client_ca, "rb") as ca_file:
            roots = ca_file.read()
    return grpc.ssl_server_credentials(
        [pair], root_certificates=roots, require_client_auth=roots is not None)


def _metadata(context: Any) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        found[str(key).lower()] = text
    return found


class GrpcFront:
    """The gRPC server of one service (see the module docstring)."""

    def __init__(self, service: Service, config: ServeConfig) -> None:
        self.service = service
        self.config = config
        self.server: Any = None
        self._stopping: Any = None

    async def start(self) -> None:
        limit = self.config.max_body
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit)])
        send_service, send_name = _split(netwire.GRPC_METHOD)
        stream_service, stream_name = _split(netwire.GRPC_STREAM_METHOD)
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(
                send_service, {send_name: grpc.unary_unary_rpc_method_handler(self.send)}),
            grpc.method_handlers_generic_handler(
                stream_service,
                {stream_name: grpc.unary_stream_rpc_method_handler(self.stream)}),
        ))
        address = self.config.address
        if self.config.tls:  # reads certificate files
            credentials = await asyncio.to_thread(_credentials, self.config)
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
        if not bound:
            raise OSError(f"gRPC could not listen on {address} (in use?)")
        await server.start()
        self.server = server

    async def stop_accepting(self) -> None:
        """No new calls from now on; calls in flight run on until their runs end (the
        drain bounds them)."""
        if self.server is not None:
            grace = self.config.drain_timeout + self.config.kill_after + 10.0
            self._stopping = asyncio.ensure_future(self.server.stop(grace))

    async def close(self) -> None:
        if self._stopping is None and self.server is not None:
            await self.stop_accepting()
        if self._stopping is not None:
            await self._stopping

    # ------------------------------------------------------------ calls

    async def _take(self, request: bytes, context: Any, method: str) -> tuple[
            str | None, Listener | list[dict[str, Any]]]:
        """Authenticate, then ``Service.take``: the answer nonce, and the run's listener
        or the answer's events (or an abort with the refusal's status code)."""
        metadata = _metadata(context)
        try:
            self.service.authenticate(metadata, "grpc", method, bytes(request))
        except AuthError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"refused: {exc}")
        try:
            nonce = _extension_nonce(self.service, metadata)
            return nonce, await self.service.take(bytes(request))
        except BadFrame as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Unavailable as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.busy else \
                grpc.StatusCode.UNAVAILABLE
            await context.abort(code, str(exc))
        raise AssertionError("unreachable: abort raises")

    async def send(self, request: bytes, context: Any) -> bytes:
        """wove's unary method: the run's started and terminal events in one answer;
        a signed answer carries its signature in the initial metadata."""
        nonce, taken = await self._take(request, context, netwire.GRPC_METHOD)
        if isinstance(taken, Listener):
            try:
                events = await taken.unary_answer()
            finally:
                self.service.detach(taken)  # the caller cancelled the call: let go
        else:
            events = taken
        body = events_body(events)
        if nonce is not None:
            signature = self.service.security.sign_answer("grpc", nonce, body)
            await context.send_initial_metadata(
                tuple((key.lower(), value) for key, value in signature.items()))
        return body

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        """Our streaming method: each event as it happens, signed when asked."""
        nonce, taken = await self._take(request, context, netwire.GRPC_STREAM_METHOD)
        if not isinstance(taken, Listener):
            yield signed_message(self.service, "grpc", nonce, taken)
            return
        try:
            async for event in taken.events():
                yield signed_message(self.service, "grpc", nonce, [event])
        finally:
            self.service.detach(taken)
