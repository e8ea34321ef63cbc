"""``wove-adapters serve``: the Wove-compatible network worker service.

wove 2.x ships the client side of its ``http``/``https``/``grpc``/``websocket`` executors
and no service for them to talk to; this is that service. It speaks wove's wire format
(``core.netwire``: JSON frames with base64 cloudpickle fields, ``X-Wove-*`` signatures or a
bearer token) exactly, so wove's own executor classes work against it unchanged, plus the
extension our clients ask for (signed answers, a stream of events on every transport,
idempotency keys).

What the service promises, and how:

- **Authentication first.** A request's signature (key, timestamp window, nonce never seen
  before) or bearer token is checked on the raw bytes before anything is parsed; a refusal
  is 401/403 (HTTP), ``UNAUTHENTICATED`` (gRPC) or a refused handshake (websocket), and is
  counted on ``/healthz``. A bearer token is checked before the body is even read, a
  signed request's headers before its body is read.
- **The service never unpickles the task.** The frame's pickled callable and arguments go,
  as bytes, into a signed payload envelope (``core.envelope``) for the warm process pool
  (``worker.pool``): the payload process verifies it with the service's own per-process key,
  unpickles and runs the task (``worker.runner``), and hands back the signed terminal
  event; its result or exception travels on as the bytes the task's process pickled.
- **A process per task.** A cancel is SIGTERM to that process (SIGKILL ``--kill-after``
  seconds later), so it interrupts sync code too; a task that kills its own process
  (``os._exit``, a segfault) becomes a ``task_error`` of kind ``WorkerCrashed`` naming the
  exit, and the service lives on.
- **Back-pressure.** ``--max-tasks`` runs at once; later runs wait in order, at most
  ``--max-queued`` of them; past that a request is refused with 503 / ``RESOURCE_EXHAUSTED``,
  and a websocket connection is simply not read until there is room (TCP pushes back).
- **Idempotency.** A ``run_task`` whose ``delivery.delivery_idempotency_key`` names a run in
  flight attaches to it (gets its events) instead of running again; a repeat within
  ``--remember`` seconds after it ended gets the same terminal event. Events always carry
  the asking request's own ``run_id`` and ``task_id``.
- **Nobody waiting, nothing running.** A run whose every requester went away (connection
  closed) is cancelled, unless it has an idempotency key (it finishes and is remembered).
- **Draining.** SIGTERM (or SIGINT): stop accepting, finish (``--on-sigterm finish``) or
  cancel (``cancel``) the runs in flight, cancel what is left after ``--drain-timeout``,
  deliver every answer, exit 0. A second signal cancels at once.

HTTP and websocket are served by aiohttp (this module); gRPC by grpcio
(``worker.serve_grpc``, imported only for ``--transport grpc``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pickle
import secrets
import signal
import ssl
import sys
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from aiohttp import WSMsgType, web

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, netwire, signing
from wove_adapters.core.netwire import AuthError, Security
from wove_adapters.worker.pool import ChildOutcome, PoolRun, ProcessPool

TRANSPORTS = ("http", "https", "grpc", "websocket")
TERMINAL = frozenset({"task_result", "task_error", "task_cancelled"})
NDJSON = "application/x-ndjson"
NONCE_HEADER = netwire.HEADERS["nonce"]
DEFAULT_PORT = 8765
DEFAULT_MAX_BODY = 64 * 1024 * 1024
# Most remembered outcomes (idempotency keys) and early cancels at once: the oldest go first.
REMEMBER_CAPACITY = 100_000


GRPC_MISSING = ("--transport grpc needs grpcio, which is not installed: "
                "pip install 'wove-adapters[grpc]'")


class ServeConfigError(ValueError):
    """The service was started wrongly; the message is one line that names the fix."""


class Unavailable(Exception):
    """The service cannot take this run now. ``busy``: the queue is full (503 /
    RESOURCE_EXHAUSTED); otherwise it is draining (503 / UNAVAILABLE)."""

    def __init__(self, message: str, *, busy: bool) -> None:
        super().__init__(message)
        self.busy = busy


class BadFrame(ValueError):
    """An authenticated request whose frame is malformed (400 / INVALID_ARGUMENT)."""


# ==================================================================== configuration


@dataclass
class ServeConfig:
    """What ``wove-adapters serve`` was asked to do (see ``config_from_options``)."""

    transport: str
    host: str
    port: int
    security: Security
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    max_tasks: int = 4
    max_queued: int = 1000
    heartbeat: float = 5.0
    kill_after: float = 10.0
    drain_timeout: float = 30.0
    on_sigterm: str = "finish"
    remember: float = 300.0
    max_body: int = DEFAULT_MAX_BODY
    health_host: str | None = None
    health_port: int | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def address(self) -> str:
        """``HOST:PORT``, an IPv6 host in brackets (the gRPC target)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        if self.transport == "grpc":
            return self.address
        scheme = {"http": "http", "https": "https", "websocket": "ws"}[self.transport]
        if self.transport == "websocket" and self.tls:
            scheme = "wss"
        return f"{scheme}://{self.address}/"

    def server_ssl(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        if self.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls_client_ca)
        return context


def parse_listen(value: str, option: str = "--listen") -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` (port 0: any free port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ServeConfigError(
            f"{option} {value!r} is not HOST:PORT (e.g. 127.0.0.1:{DEFAULT_PORT})")
    return host.strip("[]"), int(port)


def _read_env(var: str, option: str) -> str:
    """The secret in ``var``, removed from this process's environment so task code (which
    inherits it) never sees it."""
    value = os.environ.pop(var, "")
    if not value:
        raise ServeConfigError(f"{option}: environment variable {var} is not set or empty; "
                               f"export the secret in {var} before starting serve")
    return value


def config_from_options(
    *,
    transport: str,
    listen: str,
    security: str | None = None,
    bearer_token_env: str | None = None,
    security_key: str = "default",
    clock_skew: float = netwire.DEFAULT_SKEW,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    max_tasks: int | None = None,
    max_queued: int = 1000,
    heartbeat: float = 5.0,
    kill_after: float = 10.0,
    drain_timeout: float = 30.0,
    on_sigterm: str = "finish",
    remember: float = 300.0,
    max_body: int = DEFAULT_MAX_BODY,
    health_listen: str | None = None,
) -> ServeConfig:
    """Check the command line and read the secrets; every refusal is one line naming
    the fix (``ServeConfigError``)."""
    if transport not in TRANSPORTS:
        raise ServeConfigError(f"--transport must be one of {', '.join(TRANSPORTS)}")
    if transport == "grpc":
        import importlib.util

        if importlib.util.find_spec("grpc") is None:
            raise ServeConfigError(GRPC_MISSING)
    host, port = parse_listen(listen)
    if bool(tls_cert) != bool(tls_key):
        raise ServeConfigError("--tls-cert and --tls-key go together: give both")
    tls = bool(tls_cert)
    if transport == "https" and not tls:
        raise ServeConfigError("--transport https needs --tls-cert CERT.pem --tls-key KEY.pem")
    if transport == "http" and tls:
        raise ServeConfigError("--transport http serves plain HTTP: use --transport https "
                               "with --tls-cert/--tls-key")
    if tls_client_ca and not tls:
        raise ServeConfigError("--tls-client-ca needs --tls-cert/--tls-key")
    for path in (tls_cert, tls_key, tls_client_ca):
        if path and not os.path.isfile(path):
            raise ServeConfigError(f"TLS file {path} does not exist or is not a file")
    if security and bearer_token_env:
        raise ServeConfigError("give one of --security env:VAR (signed requests) or "
                               "--bearer-token-env VAR, not both")
    if not security and not bearer_token_env:
        raise ServeConfigError("choose authentication: --security env:VAR (wove's signed "
                               "mode), --bearer-token-env VAR, or --security none (loopback only)")
    if bearer_token_env:
        auth = Security(mode="bearer", token=_read_env(bearer_token_env, "--bearer-token-env"))
    elif security == "none":
        auth = Security()
    elif security and security.startswith("env:") and security[4:]:
        auth = Security(mode="signed", secret=_read_env(security[4:], "--security").encode(),
                        key=security_key, skew=float(clock_skew))
    else:
        raise ServeConfigError(f"--security {security!r}: use env:VARIABLE (the shared "
                               "secret is in $VARIABLE) or none")
    if not netwire.is_loopback(host) and not (tls and auth.mode != "none"):
        missing = " and ".join(
            what for what, ok in (("TLS (--tls-cert/--tls-key)", tls),
                                  ("authentication (--security env:VAR or "
                                   "--bearer-token-env VAR)", auth.mode != "none")) if not ok
        )
        raise ServeConfigError(
            f"refusing to listen on non-loopback address {host} without {missing}; "
            f"add it, or listen on 127.0.0.1 behind a TLS proxy"
        )
    if max_tasks is not None and max_tasks < 1:
        raise ServeConfigError("--max-tasks must be at least 1")
    if max_queued < 0:
        raise ServeConfigError("--max-queued must be 0 or more")
    for name, value in (("--heartbeat", heartbeat), ("--kill-after", kill_after),
                        ("--drain-timeout", drain_timeout), ("--remember", remember)):
        if value < 0 or (name == "--heartbeat" and value == 0):
            raise ServeConfigError(f"{name} must be a positive number of seconds")
    if on_sigterm not in ("finish", "cancel"):
        raise ServeConfigError("--on-sigterm must be finish or cancel")
    health_host = health_port = None
    if health_listen:
        health_host, health_port = parse_listen(health_listen, "--health-listen")
    return ServeConfig(
        transport=transport, host=host, port=port, security=auth,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
        max_tasks=max_tasks or max(os.cpu_count() or 1, 1), max_queued=max_queued,
        heartbeat=heartbeat, kill_after=kill_after, drain_timeout=drain_timeout,
        on_sigterm=on_sigterm, remember=remember, max_body=max_body,
        health_host=health_host, health_port=health_port,
    )


# ==================================================================== events on the wire


def wire_event(kind: str, run_id: str, task_id: str, **fields: Any) -> dict[str, Any]:
    """An event as it goes on the wire: pickled fields are already base64 text."""
    return {"type": kind, "run_id": run_id, "task_id": task_id, **fields}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error_wire(run_id: str, task_id: str, kind: str, message: str, *, source: str,
               retryable: bool = False, traceback: str = "") -> dict[str, Any]:
    """A ``task_error`` the service itself reports (no exception object: a client that
    does not have our classes must still read it; wove raises EnvironmentExecutionError)."""
    error = {"kind": kind, "message": message, "traceback": traceback,
             "retryable": retryable, "source": source}
    return wire_event("task_error", run_id, task_id, error_pickle=_b64(pickle.dumps(error)))


def outcome_wire(event: frames.WireEvent, run_id: str, task_id: str) -> dict[str, Any]:
    """The wove wire form of the terminal event a payload process signed. Its result
    and exception are the bytes that process pickled: the service never unpickles them."""
    if isinstance(event, frames.TaskResult):
        return wire_event("task_result", run_id, task_id, result_pickle=_b64(event.result))
    if isinstance(event, frames.TaskError):
        extra = {} if event.exception is None else {"exception_pickle": _b64(event.exception)}
        error = event.error.to_dict()
        return wire_event("task_error", run_id, task_id,
                          error_pickle=_b64(pickle.dumps(error)), **extra)
    if isinstance(event, frames.TaskCancelled):
        return wire_event("task_cancelled", run_id, task_id)
    raise ValueError(f"not a terminal event: {type(event).__name__}")


class _Pickled:
    """Pickles as "unpickle these bytes": the task's pickled callable and arguments become
    the envelope's ``(callable, args)`` body without being unpickled here."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        return (pickle.loads, (self.data,))


def _field_bytes(frame: Mapping[str, Any], name: str) -> bytes | None:
    try:
        return netwire.pickled_bytes(frame, name)
    except ValueError as exc:
        raise BadFrame(str(exc)) from None


def parse_frame(body: bytes | str) -> dict[str, Any]:
    """JSON only (nothing unpickled): an authenticated request's frame."""
    try:
        frame = netwire.load_json(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadFrame(f"the request body is not JSON: {exc}") from None
    if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
        raise BadFrame("a frame is a JSON object with a 'type'")
    return frame


def _ident(frame: Mapping[str, Any]) -> tuple[str, str]:
    run_id, task_id = frame.get("run_id"), frame.get("task_id")
    if not isinstance(run_id, str) or not run_id:
        raise BadFrame(f"{frame.get('type')} needs a run_id (a non-empty string)")
    return run_id, task_id if isinstance(task_id, str) else ""


# ==================================================================== runs


class Listener:
    """One requester's view of a run: its events, rewritten to its own ``run_id`` and
    ``task_id``, until (and including) the terminal one."""

    def __init__(self, run: Run | None, run_id: str, task_id: str) -> None:
        self.run = run
        self.run_id = run_id
        self.task_id = task_id
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ended = False
        self.detached = False

    def put(self, event: Mapping[str, Any]) -> None:
        if not self.detached:
            self.queue.put_nowait({**event, "run_id": self.run_id, "task_id": self.task_id})

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while not self.ended:
            event = await self.queue.get()
            if event["type"] in TERMINAL:
                self.ended = True
            yield event

    async def unary_answer(self) -> list[dict[str, Any]]:
        """What one unary call answers with (wove's HTTP and gRPC clients): the run's
        ``task_started``, if any, then its terminal event."""
        answer: list[dict[str, Any]] = []
        async for event in self.events():
            if event["type"] == "task_started" and not answer:
                answer.append(event)
            elif event["type"] in TERMINAL:
                answer.append(event)
        return answer


class Run:
    """One task in the service: queued, running in a payload process, or ended."""

    def __init__(self, run_id: str, task_id: str, key: str | None, payload: str,
                 heartbeat: float) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.key = key
        self.payload = payload
        self.heartbeat = heartbeat
        self.listeners: list[Listener] = []
        self.started = False
        self.cancelled = False
        self.keep = key is not None  # runs on when nobody listens any more
        self.terminal: dict[str, Any] | None = None
        self.pool_run: PoolRun | None = None
        self.waiter: asyncio.Future[bool] | None = None
        self.done = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def broadcast(self, event: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            listener.put(event)


def _refusal_kind(exc: AuthError) -> str:
    text = str(exc)
    for needle, kind in (("not signed", "unsigned"), ("replayed", "replayed_nonce"),
                         ("timestamp", "stale_timestamp"), ("bad signature", "bad_signature"),
                         ("bearer", "bad_token"), ("key id", "unknown_key"),
                         ("plain frame", "plain_frame")):
        if needle in text:
            return kind
    return "other"


class Service:
    """The run table, the slots, authentication and health, shared by every transport."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.security = config.security
        self.pool = ProcessPool(None, kill_after=config.kill_after,
                                linger=config.kill_after + 2.0)
        # The local hop to the payload processes is signed with a key of this process
        # alone; they inherit it through the environment (as they inherit nothing else
        # secret: the network secret was removed from it when it was read).
        local = secrets.token_hex(32)
        self.key_id = signing.KEYRING.add(local.encode())
        os.environ[signing.SECRETS_ENV] = ",".join(
            filter(None, [local, os.environ.get(signing.SECRETS_ENV, "")])
        )
        self.accepting = True
        self.runs: dict[str, Listener] = {}  # every in-flight requester's run_id
        self.by_key: dict[str, Run] = {}
        self.active: set[Run] = set()
        self.remembered: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.cancelled_early: OrderedDict[str, float] = OrderedDict()
        self._free = config.max_tasks
        self._waiting: deque[Run] = deque()
        self._room = asyncio.Condition()
        self.refusals: dict[str, int] = {}
        self.counts = {"started": 0, "succeeded": 0, "failed": 0, "cancelled": 0,
                       "crashed": 0, "attached": 0, "busy": 0, "cancel_requests": 0,
                       "cancel_unknown": 0}

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.aclose()

    # ------------------------------------------------------------ authentication

    def precheck(self, headers: Mapping[str, Any]) -> None:
        """Before a body is read: a bearer token is checked whole; a signed request
        must carry its four headers and a timestamp in the window."""
        if self.security.mode == "bearer":
            self.authenticate(headers, "", "", b"")
        elif self.security.mode == "signed":
            values = {str(k).lower(): str(v) for k, v in headers.items()}
            try:
                if not all(values.get(h.lower()) for h in netwire.HEADERS.values()):
                    raise AuthError("request is not signed (X-Wove-Key/Timestamp/Nonce/Signature)")
                try:
                    stamp = float(values[netwire.HEADERS["timestamp"].lower()])
                except ValueError:
                    raise AuthError("timestamp is not a number") from None
                if abs(time.time() - stamp) > self.security.skew:
                    raise AuthError(f"timestamp outside the {self.security.skew:g} s window "
                                    f"(stale or clock skew)")
            except AuthError as exc:
                self._refused(exc)
                raise

    def authenticate(self, headers: Mapping[str, Any], transport: str, target: str,
                     body: bytes) -> None:
        """``Security.verify`` on the raw bytes, refusals counted."""
        try:
            self.security.verify(headers, transport, target, body)
        except AuthError as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: AuthError | str) -> None:
        kind = exc if isinstance(exc, str) else _refusal_kind(exc)
        self.refusals[kind] = self.refusals.get(kind, 0) + 1
        print(f"wove-adapters serve: refused a request ({kind}): {exc}", file=sys.stderr)

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            own = version("wove-adapters")
        except PackageNotFoundError:
            own = "unknown"
        running = sum(1 for run in self.active if run.started and run.terminal is None)
        return {
            "ok": self.accepting,
            "draining": not self.accepting,
            "running": running,
            "queued": len(self._waiting),
            "capacity": self.config.max_tasks,
            "max_queued": self.config.max_queued,
            "transport": self.config.transport,
            "security": self.security.mode,
            "version": own,
            "refusals": sum(self.refusals.values()),
            "refused": dict(self.refusals),
            "runs": dict(self.counts),
        }

    # ------------------------------------------------------------ submitting

    def _full(self) -> bool:
        return self._free <= 0 and len(self._waiting) >= self.config.max_queued

    async def submit(self, frame: Mapping[str, Any], *, wait_for_room: bool) -> Listener:
        """Take a ``run_task`` frame: a listener on a new run, on the run in flight with
        the same idempotency key or run id, or on a remembered (or cancelled) outcome."""
        run_id, task_id = _ident(frame)
        delivery = frame.get("delivery") if isinstance(frame.get("delivery"), dict) else {}
        assert isinstance(delivery, dict)
        raw_key = delivery.get("delivery_idempotency_key")
        key = None if raw_key is None else str(raw_key)
        self._forget_expired()
        if not self.accepting:
            raise Unavailable("the service is draining (SIGTERM): send the run elsewhere "
                              "or again once it is back", busy=False)
        if run_id in self.cancelled_early:
            return self._settled(run_id, task_id, wire_event("task_cancelled", run_id, task_id))
        if key is not None:
            if key in self.by_key:
                return self._attach(self.by_key[key], run_id, task_id)
            if key in self.remembered:
                self.counts["attached"] += 1
                return self._settled(run_id, task_id, self.remembered[key][1])
        if run_id in self.runs and self.runs[run_id].run is not None:
            found = self.runs[run_id].run
            assert found is not None
            return self._attach(found, run_id, task_id)
        callable_raw = _field_bytes(frame, "callable")
        if callable_raw is None:
            raise BadFrame("run_task needs callable_pickle")
        args_raw = _field_bytes(frame, "args")
        if self._full():
            if not wait_for_room:
                self.counts["busy"] += 1
                raise Unavailable(
                    f"busy: {self.config.max_tasks} tasks running and "
                    f"{len(self._waiting)} waiting (--max-queued {self.config.max_queued}); "
                    f"retry later", busy=True)
            async with self._room:
                await self._room.wait_for(lambda: not self._full() or not self.accepting)
            if not self.accepting:
                raise Unavailable("the service is draining (SIGTERM)", busy=False)
            if key is not None and key in self.by_key:  # it arrived while we waited
                return self._attach(self.by_key[key], run_id, task_id)
        body = pickle.dumps(
            (_Pickled(callable_raw), {} if args_raw is None else _Pickled(args_raw)),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        envelope = payload_mod.Envelope(
            adapter="serve", run_id=run_id, task_id=task_id,
            return_path=payload_mod.ReturnPath(kind="native"),
            delivery={k: v for k, v in delivery.items() if isinstance(v, (str, int, float, bool))},
            body=body, key_id=self.key_id, issued_at=time.time(), environment="serve",
            trace=_trace_of(delivery),
        )
        payload = payload_mod.encode_payload(envelope)
        run = Run(run_id, task_id, key, payload, self._beat_every(delivery))
        listener = self._attach(run, run_id, task_id, counted=False)
        self.active.add(run)
        if key is not None:
            self.by_key[key] = run
        run.task = asyncio.get_running_loop().create_task(self._drive(run))
        return listener

    async def take(self, body: bytes) -> Listener | list[dict[str, Any]]:
        """An authenticated unary request (HTTP POST, a gRPC call): the listener of its
        ``run_task``, or the events that answer a ``cancel_task`` or ``shutdown`` (each
        request stands alone: a shutdown has nothing to stop)."""
        frame = parse_frame(body)
        kind = frame["type"]
        if kind == "run_task":
            return await self.submit(frame, wait_for_room=False)
        if kind == "cancel_task":
            return await self.cancel(frame)
        if kind == "shutdown":
            return []
        raise BadFrame(f"unknown frame type {kind!r} (run_task, cancel_task, shutdown)")

    def _beat_every(self, delivery: Mapping[str, Any]) -> float:
        """Heartbeats every ``--heartbeat`` seconds, or three per allowed silence when the
        run asks for ``delivery_heartbeat_seconds``."""
        asked = delivery.get("delivery_heartbeat_seconds")
        if isinstance(asked, (int, float)) and not isinstance(asked, bool) and asked > 0:
            return max(min(self.config.heartbeat, asked / 3.0), 0.05)
        return self.config.heartbeat

    def _attach(self, run: Run, run_id: str, task_id: str, *, counted: bool = True) -> Listener:
        listener = Listener(run, run_id, task_id)
        run.listeners.append(listener)
        self.runs[run_id] = listener
        if counted:
            self.counts["attached"] += 1
        if run.started:
            listener.put(wire_event("task_started", run.run_id, run.task_id))
        if run.terminal is not None:
            listener.put(run.terminal)
        return listener

    @staticmethod
    def _settled(run_id: str, task_id: str, terminal: Mapping[str, Any]) -> Listener:
        listener = Listener(None, run_id, task_id)
        listener.put(terminal)
        return listener

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self.remembered and (next(iter(self.remembered.values()))[0] <= now
                                   or len(self.remembered) > REMEMBER_CAPACITY):
            self.remembered.popitem(last=False)
        while self.cancelled_early and (next(iter(self.cancelled_early.values())) <= now
                                        or len(self.cancelled_early) > REMEMBER_CAPACITY):
            self.cancelled_early.popitem(last=False)

    # ------------------------------------------------------------ running

    async def _slot(self, run: Run) -> bool:
        """A slot in arrival order; False when the run was cancelled while waiting."""
        if run.cancelled or (not self.accepting and self.config.on_sigterm == "cancel"):
            return False
        if self._free > 0:  # runs wait only while every slot is taken
            self._free -= 1
            return True
        run.waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(run)
        try:
            return await run.waiter
        finally:
            run.waiter = None
            with contextlib.suppress(ValueError):
                self._waiting.remove(run)
            await self._notify_room()

    def _release(self) -> None:
        while self._waiting:
            run = self._waiting.popleft()
            if run.waiter is not None and not run.waiter.done():
                run.waiter.set_result(True)
                return
        self._free += 1

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    async def _drive(self, run: Run) -> None:
        terminal: dict[str, Any]
        try:
            if not await self._slot(run):
                terminal = wire_event("task_cancelled", run.run_id, run.task_id)
            else:
                try:
                    terminal = await self._execute(run)
                finally:
                    self._release()
                    await self._notify_room()
        except Exception as exc:  # the service's own failure: say so, never hang the caller
            print(f"wove-adapters serve: run {run.run_id} failed in the service: "
                  f"{type(exc).__name__}: {exc}", file=sys.stderr)
            terminal = error_wire(run.run_id, run.task_id, "ServeError",
                                  f"wove-adapters serve could not run the task: "
                                  f"{type(exc).__name__}: {exc}", source="worker")
        self._finish(run, terminal)

    async def _execute(self, run: Run) -> dict[str, Any]:
        if run.cancelled:
            return wire_event("task_cancelled", run.run_id, run.task_id)
        run.started = True
        self.counts["started"] += 1
        run.broadcast(wire_event("task_started", run.run_id, run.task_id))
        pool_run = run.pool_run = self.pool.run(run.payload, keep_outcome=True)
        if run.cancelled:
            pool_run.cancel(signal.SIGTERM, kill_after=self.config.kill_after)
        beat = asyncio.get_running_loop().create_task(self._beat(run))
        try:
            outcome = await pool_run
        finally:
            beat.cancel()
        return self._terminal(run, outcome)

    async def _beat(self, run: Run) -> None:
        while True:
            await asyncio.sleep(run.heartbeat)
            run.broadcast(wire_event("heartbeat", run.run_id, run.task_id))

    def _terminal(self, run: Run, outcome: ChildOutcome) -> dict[str, Any]:
        """The run's terminal event from how its payload process ended."""
        if outcome.outcome:
            blob = signing.decode_blob(bytes(outcome.outcome))
            body = signing.verify(blob, window=None, key_id=self.key_id)
            batch = msgspec.msgpack.decode(body, type=frames.EventBatch)
            for event in reversed(batch.events):
                if isinstance(event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled)):
                    return outcome_wire(event, run.run_id, run.task_id)
            raise ValueError("the payload process's outcome holds no terminal event")
        if outcome.state == "cancelled" or run.cancelled:
            return wire_event("task_cancelled", run.run_id, run.task_id)
        if outcome.state == "lost":
            self.counts["crashed"] += 1
            how = outcome.notice or "the payload process died"
            return error_wire(
                run.run_id, run.task_id, "WorkerCrashed",
                f"{how} while running task '{run.task_id}' (run {run.run_id}); the service "
                f"is still up", source="worker")
        raise RuntimeError(f"the payload process ended {outcome.state} without an outcome "
                           f"({outcome.notice or 'see the service log'})")

    def _finish(self, run: Run, terminal: dict[str, Any]) -> None:
        run.terminal = terminal
        kind = terminal["type"]
        counted = {"task_result": "succeeded", "task_error": "failed"}.get(kind, "cancelled")
        self.counts[counted] += 1
        run.broadcast(terminal)
        for listener in run.listeners:
            if self.runs.get(listener.run_id) is listener:
                del self.runs[listener.run_id]
        if run.key is not None:
            if self.by_key.get(run.key) is run:
                del self.by_key[run.key]
            if kind != "task_cancelled" and self.config.remember > 0:
                self.remembered[run.key] = (time.monotonic() + self.config.remember, terminal)
        self.active.discard(run)
        run.done.set()

    # ------------------------------------------------------------ cancelling

    def cancel_run(self, run: Run) -> None:
        """Stop a run: a waiting one never starts; a running one gets SIGTERM now and
        SIGKILL ``--kill-after`` seconds later."""
        if run.terminal is not None:
            return
        run.cancelled = True
        if run.waiter is not None and not run.waiter.done():
            run.waiter.set_result(False)
        elif run.pool_run is not None:
            run.pool_run.cancel(signal.SIGTERM, kill_after=self.config.kill_after)

    async def cancel(self, frame: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A ``cancel_task`` frame's answer: ``task_cancelled`` when the run was stopped
        (or never started), [] when it is unknown or ended otherwise. A cancel that comes
        before its run is remembered, so that run never starts."""
        run_id, task_id = _ident(frame)
        self.counts["cancel_requests"] += 1
        listener = self.runs.get(run_id)
        run = listener.run if listener is not None else None
        if listener is None or run is None:
            self.counts["cancel_unknown"] += 1
            self._forget_expired()
            self.cancelled_early[run_id] = time.monotonic() + max(self.config.remember, 60.0)
            return []
        cancelled = wire_event("task_cancelled", run_id, listener.task_id or task_id)
        if len(run.listeners) > 1:  # others still want it: only this requester lets go
            listener.put(cancelled)
            self.detach(listener)
            return [cancelled]
        self.cancel_run(run)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.done.wait(), self.config.kill_after + 5.0)
        if run.terminal is not None and run.terminal["type"] == "task_cancelled":
            return [cancelled]
        return []

    def detach(self, listener: Listener) -> None:
        """A requester went away (or let go): a run nobody waits for any more is
        cancelled, unless it has an idempotency key (it finishes and is remembered)."""
        run = listener.run
        if listener.detached or listener.ended or run is None:
            return
        listener.detached = True
        with contextlib.suppress(ValueError):
            run.listeners.remove(listener)
        if self.runs.get(listener.run_id) is listener:
            del self.runs[listener.run_id]
        if not run.listeners and not run.keep:
            self.cancel_run(run)

    # ------------------------------------------------------------ draining

    def cancel_all(self) -> None:
        for run in list(self.active):
            self.cancel_run(run)

    async def drain(self) -> None:
        """Stop taking runs; finish (or cancel) those in flight within the drain timeout;
        cancel what is left, and wait until every run has its terminal event."""
        self.accepting = False
        await self._notify_room()  # websocket readers waiting for room give up
        if self.config.on_sigterm == "cancel":
            self.cancel_all()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._all_done(), self.config.drain_timeout)
        if self.active:
            print(f"wove-adapters serve: {len(self.active)} run(s) still going after "
                  f"--drain-timeout {self.config.drain_timeout:g}s: cancelling them",
                  file=sys.stderr)
            self.cancel_all()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_done(), self.config.kill_after + 5.0)

    async def _all_done(self) -> None:
        while self.active:
            await next(iter(self.active)).done.wait()


# ==================================================================== HTTP and websocket


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def events_body(events: list[dict[str, Any]]) -> bytes:
    """wove's answer: ``{"events": [...]}`` (the events are already in wire form)."""
    return _json_bytes({"events": events})


def signed_message(service: Service, transport: str, nonce: str | None,
                   events: list[dict[str, Any]]) -> bytes:
    """One message of our streaming extension: ``{"body": "<events JSON>", "sig": {...}}``."""
    body = events_body(events)
    sig = service.security.sign_answer(transport, nonce, body) if nonce is not None else {}
    return _json_bytes({"body": body.decode("utf-8"), "sig": sig})


def _refusal(exc: AuthError, headers: Mapping[str, Any]) -> web.Response:
    """401 when no credentials came at all, 403 when they came and were wrong."""
    names = {str(k).lower() for k in headers}
    presented = "authorization" in names or netwire.HEADERS["signature"].lower() in names
    return web.json_response({"error": f"refused: {exc}"}, status=403 if presented else 401)


def _extension_nonce(service: Service, headers: Mapping[str, Any]) -> str | None:
    """The nonce answers are bound to when the request asks for signed answers (our
    clients), None for wove's own clients; BadFrame when it cannot be honoured."""
    values = {str(k).lower(): v for k, v in headers.items()}
    if netwire.SIGNED_ANSWER_HEADER.lower() not in values:
        return None
    if service.security.mode == "none":
        raise BadFrame("signed answers need authentication on the service "
                       "(--security env:VAR or --bearer-token-env VAR)")
    nonce = values.get(NONCE_HEADER.lower())
    if not nonce:
        raise BadFrame(f"signed answers need an {NONCE_HEADER} header")
    return str(nonce)


class HttpFront:
    """POST / (wove's HTTP and HTTPS executors) or the websocket at / (wove's websocket
    executor), and GET /healthz, on aiohttp."""

    def __init__(self, service: Service, config: ServeConfig, *, health_only: bool = False,
                 host: str | None = None, port: int | None = None) -> None:
        self.service = service
        self.config = config
        self.health_only = health_only
        self.host = config.host if host is None else host
        self.port = config.port if port is None else port
        self.connections: set[_WsConnection] = set()
        self.site: web.TCPSite | None = None
        app = web.Application(client_max_size=config.max_body)
        app.router.add_get("/healthz", self.healthz)
        if not health_only:
            if config.transport == "websocket":
                app.router.add_get("/", self.websocket)
            else:
                app.router.add_post("/", self.post)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                    shutdown_timeout=5.0)

    async def start(self) -> None:
        await self.runner.setup()
        ssl_context = None if self.health_only else \
            await asyncio.to_thread(self.config.server_ssl)  # reads certificate files
        self.site = web.TCPSite(self.runner, self.host, self.port, ssl_context=ssl_context)
        await self.site.start()

    async def stop_accepting(self) -> None:
        if self.site is not None and not self.health_only:
            await self.site.stop()

    async def close(self) -> None:
        """After the drain: every connection's pumps deliver their terminal events, then
        the websockets close (1001, going away) and HTTP handlers finish their answers."""
        pumps = [pump for conn in self.connections for pump in conn.pumps]
        if pumps:
            await asyncio.wait(pumps, timeout=5.0)
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(code=1001, message=b"service stopping")
        await self.runner.cleanup()

    # ------------------------------------------------------------ handlers

    async def healthz(self, request: web.Request) -> web.Response:
        health = self.service.health()
        return web.json_response(health, status=200 if health["ok"] else 503)

    async def post(self, request: web.Request) -> web.StreamResponse:
        service = self.service
        try:
            service.precheck(request.headers)
            body = await request.read()
            service.authenticate(request.headers, "http", request.path_qs, body)
        except AuthError as exc:
            return _refusal(exc, request.headers)
        try:
            nonce = _extension_nonce(service, request.headers)
            taken = await service.take(body)
        except BadFrame as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except Unavailable as exc:
            return web.json_response({"error": str(exc)}, status=503,
                                     headers={"Retry-After": "1"})
        if not isinstance(taken, Listener):
            return self._answer(taken, nonce)
        try:
            if NDJSON in request.headers.get("Accept", ""):
                return await self._stream(request, taken, nonce)
            return self._answer(await taken.unary_answer(), nonce)
        finally:
            service.detach(taken)  # the client went away (handler cancelled): let go

    def _answer(self, events: list[dict[str, Any]], nonce: str | None) -> web.Response:
        body = events_body(events)
        headers = {"Content-Type": "application/json"}
        if nonce is not None:
            headers.update(self.service.security.sign_answer("http", nonce, body))
        return web.Response(body=body, headers=headers)

    async def _stream(self, request: web.Request, listener: Listener,
                      nonce: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": NDJSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        async for event in listener.events():
            await response.write(signed_message(self.service, "http", nonce, [event]) + b"\n")
        await response.write_eof()
        return response

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        service = self.service
        try:
            service.authenticate(request.headers, "websocket", request.path_qs, b"")
            nonce = _extension_nonce(service, request.headers)
        except AuthError as exc:
            return _refusal(exc, request.headers)
        except BadFrame as exc:
            return web.json_response({"error": str(exc)}, status=400)
        ws = web.WebSocketResponse(max_msg_size=self.config.max_body)
        await ws.prepare(request)
        connection = _WsConnection(service, ws, nonce, request.path_qs)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)
            await connection.close()
        return ws


class _WsConnection:
    """One websocket: frames in, each run's events out as they happen."""

    def __init__(self, service: Service, ws: web.WebSocketResponse, nonce: str | None,
                 target: str) -> None:
        self.service = service
        self.ws = ws
        self.nonce = nonce  # set: our extension (signed frames both ways)
        self.target = target
        self.listeners: dict[str, Listener] = {}
        self.pumps: set[asyncio.Task[None]] = set()
        self.lock = asyncio.Lock()

    async def send(self, events: list[dict[str, Any]]) -> None:
        if self.nonce is not None:
            data = signed_message(self.service, "websocket", self.nonce, events)
        else:
            data = _json_bytes(events[0] if len(events) == 1 else {"events": events})
        async with self.lock:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_str(data.decode("utf-8"))

    async def serve(self) -> None:
        async for message in self.ws:
            if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            raw = message.data.encode("utf-8") if message.type == WSMsgType.TEXT else message.data
            try:
                body = self._open(raw)
            except AuthError as exc:  # counted where it was refused
                await self.ws.close(code=1008, message=b"refused: " + str(exc).encode()[:100])
                return
            if not await self._handle(body):
                return

    def _open(self, raw: bytes) -> bytes:
        """The frame's JSON bytes; on an extension connection, only after its signature
        (per message, nonce-checked) verified."""
        if self.nonce is None:
            return raw
        try:
            wrapper = json.loads(raw)
        except ValueError:
            wrapper = None
        if not isinstance(wrapper, dict) or not isinstance(wrapper.get("body"), str) \
                or not isinstance(wrapper.get("sig"), dict):
            exc = AuthError("plain frame on a signed connection: each frame must be {body, sig}")
            self.service._refused(exc)
            raise exc
        body = wrapper["body"].encode("utf-8")
        self.service.authenticate(wrapper["sig"], "websocket", self.target, body)
        return body

    async def _handle(self, body: bytes) -> bool:
        """Act on one frame; False ends the connection (shutdown)."""
        service = self.service
        frame: dict[str, Any] = {}
        try:
            frame = parse_frame(body)
            kind = frame["type"]
            if kind == "run_task":
                listener = await service.submit(frame, wait_for_room=True)
                self.listeners[listener.run_id] = listener
                pump = asyncio.get_running_loop().create_task(self._pump(listener))
                self.pumps.add(pump)
                pump.add_done_callback(self.pumps.discard)
            elif kind == "cancel_task":
                run_id = frame.get("run_id")
                mine = isinstance(run_id, str) and run_id in self.listeners
                answer = await service.cancel(frame)
                if answer and not mine:  # our own pump delivers the run's task_cancelled
                    await self.send(answer)
            elif kind == "shutdown":
                detach = frame.get("delivery_orphan_policy") == "detach"
                for listener in list(self.listeners.values()):
                    if detach and listener.run is not None:
                        listener.run.keep = True
                    elif listener.run is not None and not listener.ended:
                        await service.cancel({"run_id": listener.run_id})
                return True
            else:
                raise BadFrame(f"unknown frame type {kind!r}")
        except (BadFrame, Unavailable) as exc:
            run_id = frame.get("run_id")
            if isinstance(run_id, str) and frame.get("type") == "run_task":
                task_id = frame.get("task_id")
                draining = isinstance(exc, Unavailable)
                await self.send([error_wire(
                    run_id, task_id if isinstance(task_id, str) else "",
                    "ServiceUnavailable" if draining else "BadFrame", str(exc),
                    source="transport", retryable=draining)])
            else:
                await self.send([{"type": "log", "level": "error", "message": str(exc)}])
        return True

    async def _pump(self, listener: Listener) -> None:
        async for event in listener.events():
            await self.send([event])
        self.listeners.pop(listener.run_id, None)

    async def close(self) -> None:
        for listener in list(self.listeners.values()):
            self.service.detach(listener)
        for pump in list(self.pumps):
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)


# ==================================================================== the service's life


class Front(Protocol):
    async def start(self) -> None: ...
    async def stop_accepting(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class _Signals:
    count: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


async def serve(config: ServeConfig) -> int:
    """Run the service until SIGTERM/SIGINT, then drain; returns the exit code."""
    service = Service(config)
    await service.start()
    fronts: list[Front] = []
    try:
        if config.transport == "grpc":
            from wove_adapters.worker.serve_grpc import GrpcFront

            fronts.append(GrpcFront(service, config))
        else:
            fronts.append(HttpFront(service, config))
        if config.health_port is not None:
            fronts.append(HttpFront(service, config, health_only=True,
                                    host=config.health_host, port=config.health_port))
        for front in fronts:
            await front.start()
    except BaseException:
        await service.close()
        raise
    signals = _Signals()
    loop = asyncio.get_running_loop()

    def _on_signal(signum: int) -> None:
        signals.count += 1
        if signals.count == 1:
            signals.event.set()
        else:
            print("wove-adapters serve: second signal: cancelling the runs in flight",
                  file=sys.stderr)
            service.cancel_all()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _on_signal, signum)
    health = "" if config.health_port is None else \
        f", health at http://{config.health_host}:{config.health_port}/healthz"
    print(f"wove-adapters serve: listening on {config.url} (transport {config.transport}, "
          f"security {config.security.mode}{', TLS' if config.tls else ''}, "
          f"max tasks {config.max_tasks}{health})", file=sys.stderr, flush=True)
    await signals.event.wait()
    print(f"wove-adapters serve: draining ({config.on_sigterm} in-flight runs, at most "
          f"{config.drain_timeout:g}s)", file=sys.stderr, flush=True)
    for front in fronts:
        await front.stop_accepting()
    await service.drain()
    for front in fronts:
        await front.close()
    await service.close()
    print("wove-adapters serve: stopped", file=sys.stderr, flush=True)
    return 0


SERVE_URL_ENV = "WOVE_ADAPTERS_SERVE_URL"


def probe_health(url: str, timeout: float = 5.0) -> tuple[str, bool, str]:
    """A ``doctor`` row for a running service: its ``/healthz`` (http, https, ws, wss
    URLs), or a TCP connect (a gRPC ``HOST:PORT`` target)."""
    import socket
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url if "://" in url else f"grpc://{url}")
    if parts.scheme == "grpc":
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 0), timeout):
                return ("serve reachable", True, f"{url} accepts connections (gRPC)")
        except OSError as exc:
            return ("serve reachable", False, f"{url}: {exc}; is wove-adapters serve running?")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    health = urllib.parse.urlunsplit((scheme, parts.netloc, "/healthz", "", ""))
    try:
        with urllib.request.urlopen(health, timeout=timeout) as answer:
            found = json.loads(answer.read())
    except Exception as exc:
        return ("serve /healthz", False, f"{health}: {type(exc).__name__}: {exc}; is "
                f"wove-adapters serve running there?")
    return ("serve /healthz", bool(found.get("ok")),
            f"{found.get('transport')} {found.get('security')}, running "
            f"{found.get('running')}/{found.get('capacity')}, queued {found.get('queued')}, "
            f"refusals {found.get('refusals')}, version {found.get('version')}")


def main(config: ServeConfig) -> int:
    code = asyncio.run(serve(config))
    # Drained: closing the loop put SIGTERM and SIGINT back to their defaults, and a
    # second signal (a supervisor repeating its stop) must not turn the clean exit that
    # follows (interpreter shutdown, exit hooks) into a death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    return code


def _trace_of(delivery: Mapping[str, Any]) -> dict[str, str] | None:
    """The caller's W3C trace context of the attempt, if its ``delivery`` carries one
    (``RunAttempt.task_frame``): the task's span on this service is its child."""
    trace = {key: delivery[key] for key in ("traceparent", "tracestate")
             if isinstance(delivery.get(key), str)}
    return trace if "traceparent" in trace else None
