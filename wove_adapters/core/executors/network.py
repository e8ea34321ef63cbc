"""``http``, ``https`` and ``websocket``: wove's network executors, client side, with our
delivery policies (``grpc`` lives in ``network_grpc``, so ``grpcio`` stays optional).

They send wove 2.x frames (``netwire``) to a Wove-compatible worker service, in practice
``wove-adapters serve``, and speak our extension of that wire (docs/network-executors.md):

- every request asks for signed answers (``netwire.SIGNED_ANSWER_HEADER``) and every answer
  is verified (``Security.verify_answer``, bound to the request's nonce) before one byte of
  it is unpickled. wove's own clients trust whatever answers them; ours cannot, because a
  result is a pickle and unpickling runs code. So ``security`` "none" is refused here;
- runs are streamed (HTTP NDJSON, one websocket per transport), so ``task_started`` and
  heartbeats arrive while the task runs, and the dispatcher's heartbeat, timeout and
  ``require_ack`` policies work as on any backend;
- the connection is the run's liveness: a connection that drops, or a stream that ends
  before the run's terminal event (the service was killed or restarted), is reported as
  ``task_lost`` for each run it carried, and the dispatcher applies the orphan policy
  (``requeue`` sends the run again, under the same idempotency key).

A request the service refuses (bad signature, wrong token) fails its run with
``PayloadError`` naming ``executor_config.security``; an answer that does not verify fails
its run the same way, and nothing of it is unpickled.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import json
import logging
import secrets
import ssl
import urllib.parse
from collections.abc import Mapping
from typing import Any

import msgspec

from wove_adapters.core import frames, netwire
from wove_adapters.core.aio import retrying
from wove_adapters.core.errors import BackendUnavailableError, ExecutorConfigError, PayloadError
from wove_adapters.core.options import ExecutorOptions
from wove_adapters.core.policies import Capabilities
from wove_adapters.core.transport import Emit, RunAttempt, StartContext, Transport

log = logging.getLogger("wove_adapters.network")

# How long ``submit`` waits for the service to take a request (HTTP response headers, the
# first gRPC message): a refusal or an unreachable service then fails ``submit`` itself,
# naming the address. A service that holds its answer longer (its slots are full) gets
# the run anyway; later failures arrive as events.
ACCEPT_WAIT = 5.0
# Seconds to open a TCP connection when ``timeout`` / ``open_timeout`` is unset.
CONNECT_TIMEOUT = 10.0
# Seconds a cancel request may take when ``timeout`` is unset.
CANCEL_TIMEOUT = 10.0
# The largest answer line / message taken (a result travels inline, base64 in JSON).
MAX_MESSAGE = 1 << 31
# A requeued attempt (its run was lost: the service died or restarted) waits this long
# for the service to take requests again before the run fails as unreachable.
REQUEUE_WAIT = 20.0
# Websocket pings: a peer that stops answering them is a dropped connection.
WS_PING_SECONDS = 10.0
# Characters of a refusal's body quoted in an error.
_QUOTE = 300


# ---------------------------------------------------------------- options


class NetworkOptions(ExecutorOptions, kw_only=True):
    """Keys every network executor reads (see docs/network-executors.md)."""

    # wove's forms: "env:VAR" (signed, secret from VAR) or a table (signed or bearer).
    # Required by our clients: answers are verified with it.
    security: str | dict[str, Any] | None = None
    # wove's development switch; honoured only for loopback targets.
    insecure: bool = False
    # TLS: the root certificates to trust (PEM file), and a client certificate and key.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class HttpOptions(NetworkOptions, kw_only=True):
    """``executor_config`` of ``http`` and ``https``."""

    url: str | None = None
    headers: dict[str, Any] = {}
    # Seconds to connect, and for each read of the answer stream (None: no read bound).
    timeout: float | None = None


class WebSocketOptions(NetworkOptions, kw_only=True):
    """``executor_config`` of ``websocket``."""

    url: str | None = None
    headers: dict[str, Any] = {}
    # Seconds to open the connection (TCP, TLS and handshake).
    open_timeout: float | None = None


class GrpcOptions(NetworkOptions, kw_only=True):
    """``executor_config`` of ``grpc`` (declared here so a configuration is checked on a
    machine without ``grpcio``)."""

    target: str | None = None
    # wove's unary method (cancel requests); runs use netwire.GRPC_STREAM_METHOD.
    method: str = netwire.GRPC_METHOD
    metadata: dict[str, Any] | list[Any] = {}
    # Seconds to connect, and for a cancel call (None: CONNECT_TIMEOUT / CANCEL_TIMEOUT).
    timeout: float | None = None
    secure: bool = False
    # wove's key: PEM text of the root certificates (ca_file reads them from a file).
    root_certificates: str | bytes | None = None


# ---------------------------------------------------------------- shared pieces


class AnswerError(PayloadError):
    """An answer of the service that failed verification or was malformed: nothing of it
    was unpickled."""


class _Flight:
    """One attempt of a run at the service: its stream and what was seen on it."""

    __slots__ = (
        "accepted", "attempt", "cancel_requested", "finished", "lost", "recancelled",
        "returned", "run", "task",
    )

    def __init__(self, run: RunAttempt) -> None:
        self.run = run
        self.attempt = run.attempt
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.finished = False  # a terminal event (or task_lost) was delivered
        self.lost = False  # we reported it lost: its connection or stream is gone
        self.returned = False  # submit returned: failures are events from now on
        self.cancel_requested = False
        self.recancelled = False

    def accept(self) -> None:
        if not self.accepted.done():
            self.accepted.set_result(None)


def cancel_frame(run: RunAttempt, mode: str) -> dict[str, Any]:
    return {
        "type": frames.CANCEL_TASK,
        "run_id": run.run_id,
        "task_id": run.task_id,
        "delivery_cancel_mode": mode,
        "delivery_orphan_policy": run.policy.orphan_policy,
    }


def event_from_wire(
    raw: Mapping[str, Any], run_id: str, task_id: str, attempt: int, *, where: str
) -> dict[str, Any] | None:
    """A verified wove event dict as our frame, for ``run_id``/``attempt`` (wove's events
    carry no attempt; the stream or connection they came on says which). Unpickling goes
    through ``stdio.event_frame``: a result the caller cannot unpickle becomes the run's
    error, never an exception on the shared loop. Unknown types: None."""
    from wove_adapters.core.executors.stdio import event_frame

    kind = raw.get("type")
    task_id = str(raw.get("task_id") or task_id)
    try:
        if kind == frames.TASK_RESULT:
            result = netwire.pickled_bytes(raw, "result")
            if result is None:
                raise ValueError("a task_result without result_pickle")
            return event_frame(frames.TaskResult(
                run_id=run_id, task_id=task_id, attempt=attempt, result=result
            ), where=where)
        if kind == frames.TASK_ERROR:
            return event_frame(
                frames.TaskError(
                    run_id=run_id, task_id=task_id, attempt=attempt,
                    error=_error_payload(raw), exception=netwire.pickled_bytes(raw, "exception"),
                ),
                where=where,
            )
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        error = AnswerError(f"{where}: a malformed {kind} event for run {run_id}: {exc}")
        return frames.error_event(run_id, task_id, error, attempt=attempt, source="transport")
    if kind == frames.TASK_CANCELLED:
        reason = str(raw.get("reason") or "cancelled by the service")
        return frames.event(frames.TASK_CANCELLED, run_id, task_id, attempt, reason=reason)
    if kind == frames.TASK_STARTED:
        extra = {k: raw[k] for k in ("pid", "host") if raw.get(k) is not None}
        return frames.event(frames.TASK_STARTED, run_id, task_id, attempt, **extra)
    if kind == frames.HEARTBEAT:
        return frames.event(frames.HEARTBEAT, run_id, task_id, attempt)
    if kind == frames.LOG:
        return frames.event(
            frames.LOG, run_id, task_id, attempt,
            message=str(raw.get("message", "")), level=str(raw.get("level") or "info"),
        )
    log.warning("%s: dropping an event of unknown type %r for run %s", where, kind, run_id)
    return None


def _error_payload(raw: Mapping[str, Any]) -> frames.ErrorPayload:
    """The normalized error of a ``task_error``: pickled (wove's ``error_pickle``; the
    answer was verified) or plain JSON."""
    error: Any = raw.get("error")
    data = netwire.pickled_bytes(raw, "error")
    if data is not None:
        import cloudpickle

        error = cloudpickle.loads(data)
    if not isinstance(error, Mapping):
        raise ValueError("a task_error without an error table")
    payload = {k: error[k] for k in ("kind", "message", "traceback", "retryable", "source")
               if k in error}
    payload.setdefault("kind", "Error")
    payload.setdefault("message", "")
    return msgspec.convert(payload, frames.ErrorPayload)


def signed_events(
    security: netwire.Security, transport: str, nonce: str, message: bytes | str
) -> list[dict[str, Any]]:
    """The still-pickled events of one ``{"body", "sig"}`` message, after its signature
    was checked against ``nonce``. Raises ``AnswerError`` (nothing unpickled) otherwise."""
    try:
        outer = json.loads(message)
    except ValueError as exc:
        raise AnswerError(f"an answer that is not JSON ({exc})") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("body"), str) \
            or not isinstance(outer.get("sig"), dict):
        raise AnswerError(
            "an answer without a signature ({body, sig}): is the service wove-adapters serve?"
        )
    return verified_events(security, transport, nonce, outer["sig"], outer["body"].encode())


def verified_events(
    security: netwire.Security,
    transport: str,
    nonce: str,
    headers: Mapping[str, Any],
    body: bytes,
) -> list[dict[str, Any]]:
    try:
        security.verify_answer(headers, transport, nonce, body)
    except netwire.AuthError as exc:
        raise AnswerError(
            f"an answer failed verification ({exc}); nothing of it was unpickled. "
            "executor_config.security must hold the secret (or token) the service uses"
        ) from None
    try:
        return netwire.raw_events(netwire.load_json(body))
    except ValueError as exc:
        raise AnswerError(f"a signed answer that holds no events ({exc})") from None


def answer_events(
    security: netwire.Security, transport: str, nonce: str, headers: Mapping[str, Any],
    data: bytes,
) -> list[dict[str, Any]]:
    """A whole (not streamed) answer: ``{body, sig}`` objects, one a line, or a body
    signed in the response headers (HTTP) or metadata (gRPC)."""
    lines = [line for line in data.splitlines() if line.strip()]
    if not lines:
        return []
    signed_inline = False
    with contextlib.suppress(ValueError):
        first = json.loads(lines[0])
        signed_inline = isinstance(first, dict) and "sig" in first and "body" in first
    if not signed_inline:
        return verified_events(security, transport, nonce, headers, data)
    events: list[dict[str, Any]] = []
    for line in lines:
        events.extend(signed_events(security, transport, nonce, line))
    return events


def is_loopback_target(target: str) -> bool:
    """A gRPC target (``host:port``, ``dns:``/``ipv4:``/``ipv6:`` forms, ``unix:``) on
    this machine, by wove's rule."""
    target = target.strip()
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    if "://" in target:
        parts = urllib.parse.urlsplit(target)
        if parts.scheme.startswith("unix"):
            return True
        host = parts.hostname or _endpoint_host(parts.path.lstrip("/").split("/", 1)[0])
        return netwire.is_loopback(host)
    for prefix in ("dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
            break
    return netwire.is_loopback(_endpoint_host(target.rsplit("@", 1)[-1].split("/", 1)[0]))


def _endpoint_host(endpoint: str) -> str:
    if endpoint.startswith("[") and "]" in endpoint:
        return endpoint[1:].split("]", 1)[0]
    if endpoint.count(":") == 1:
        return endpoint.rsplit(":", 1)[0]
    return endpoint


# ---------------------------------------------------------------- the base transport


class NetworkTransport(Transport, abc.ABC):
    """What the four network executors share: options, the security rules, per-run
    flights, event delivery and the lost-run reports."""

    config_struct: type[NetworkOptions] = NetworkOptions
    capabilities = Capabilities(
        cancel_queued=True,  # the service drops a run that has not started
        cancel_running=True,  # SIGTERM to the payload process
        confirm_cancel=True,  # the run's stream ends with task_cancelled
        native_idempotency=True,  # the service attaches a second request by key
        status=False,  # the open stream is the run's liveness: a drop is reported at once
        requeue=True,
        detach=False,  # the service reports to the stream, not to our ledger
        heartbeats=True,
        inline_payload_limit=1 << 62,
    )
    # The key of executor_config that says where the service is.
    address_key = "url"

    def __init__(self) -> None:
        self._emit: Emit | None = None
        self._environment = "default"
        self._security = netwire.Security()
        self._address = ""
        self._flights: dict[str, _Flight] = {}
        self._config: dict[str, Any] = {}
        # The URL-based transports' (http, https, websocket): an aiohttp session, the
        # service's URL, the path a signature binds, extra headers.
        self._session: Any = None
        self._url = ""
        self._target = "/"
        self._headers: dict[str, str] = {}

    @property
    def where(self) -> str:
        return f"environment '{self._environment}' ({self.name})"

    # ------------------------------------------------------------ start

    async def start(self, context: StartContext) -> None:
        context.check_options(self.config_struct, self.name)
        self._emit = context.emit
        self._environment = context.environment
        self._config = dict(context.executor_config)
        self._security = self._read_security(self._config.get("security"))
        await self._open(self._config)

    def _refuse(self, key: str, message: str) -> ExecutorConfigError:
        return ExecutorConfigError(
            f"{self.where}: {message}", key=key, executor=self.name,
            environment=self._environment,
        )

    def _checked_url(self, config: dict[str, Any], schemes: tuple[str, ...], example: str) -> str:
        """``executor_config.url``, refused (naming the fix) unless it is one of
        ``schemes`` with a host."""
        url = config.get("url")
        wanted = " or ".join(f"{scheme}://" for scheme in schemes)
        if not isinstance(url, str) or not url:
            raise self._refuse("url", f"executor_config.url must be the service's {wanted} "
                               f"URL, e.g. {example!r}")
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in schemes or not parts.netloc:
            raise self._refuse("url", f"executor_config.url must be a {wanted} URL, "
                               f"not {url!r}")
        return url

    def _read_security(self, value: Any) -> netwire.Security:
        try:
            security = netwire.Security.from_config(value, option="executor_config.security")
        except (ValueError, TypeError) as exc:
            raise self._refuse("security", str(exc)) from None
        if security.mode == "none":
            raise self._refuse(
                "security",
                f"executor_config.security is {'unset' if value is None else repr(value)}: "
                f"the {self.name} client verifies every answer of the service with it "
                "before anything is unpickled, so it needs one. Set security='env:VAR' "
                "(the secret `wove-adapters serve --security env:VAR` holds) or "
                "{'type': 'bearer', 'token_env': 'VAR'}",
            )
        return security

    def _check_reach(self, *, key: str, shown: str, loopback: bool, encrypted: bool,
                     tls_hint: str) -> None:
        """wove's rule, kept stricter: a target off this machine needs TLS, and
        ``insecure`` (wove's development switch) is honoured only for loopback targets."""
        insecure = bool(self._config.get("insecure"))
        if insecure and not loopback:
            raise self._refuse(
                "insecure",
                f"executor_config.insecure=True is honoured only for loopback targets "
                f"(localhost, 127.0.0.1, ::1), and {shown} is not one; {tls_hint}",
            )
        if not encrypted and not loopback:
            raise self._refuse(
                key,
                f"{shown} is not a loopback address and the connection would not be "
                f"encrypted; {tls_hint}",
            )

    def _ssl_context(self, *, encrypted: bool, shown: str) -> ssl.SSLContext | None:
        """The TLS context for https/wss (None: plain). TLS files on a plain URL are
        refused: the configuration believes it is encrypted and it is not."""
        files = {k: self._config.get(k) for k in ("ca_file", "cert_file", "key_file")}
        if not encrypted:
            given = sorted(k for k, v in files.items() if v)
            if given:
                raise self._refuse(
                    given[0],
                    f"executor_config.{given[0]} is set but {shown} is not encrypted; "
                    "use an https:// or wss:// URL",
                )
            return None
        if files["key_file"] and not files["cert_file"]:
            raise self._refuse("key_file", "executor_config.key_file needs cert_file")
        try:
            context = ssl.create_default_context(cafile=files["ca_file"] or None)
            if files["cert_file"]:
                context.load_cert_chain(str(files["cert_file"]), files["key_file"] or None)
        except (OSError, ssl.SSLError) as exc:
            raise self._refuse(
                "ca_file" if not files["cert_file"] else "cert_file",
                f"the TLS files could not be loaded: {exc}",
            ) from None
        return context

    async def _open_url(
        self, config: dict[str, Any], schemes: tuple[str, str], example: str, tls_hint: str
    ) -> ssl.SSLContext | None:
        """The URL transports' (http, https, websocket) start: ``executor_config.url``
        checked (``schemes``: plain, then encrypted), the session's URL, signed target
        and extra headers set; their TLS context (None: plain)."""
        url = self._checked_url(config, schemes, example)
        parts = urllib.parse.urlsplit(url)
        encrypted = parts.scheme == schemes[1]
        self._url = self._address = url
        self._check_reach(key="url", shown=url, loopback=netwire.is_loopback(parts.hostname),
                          encrypted=encrypted, tls_hint=tls_hint)
        context = await asyncio.to_thread(  # reads certificate files
            functools.partial(self._ssl_context, encrypted=encrypted, shown=url)
        )
        self._target = netwire.canonical_target(url)
        self._headers = {str(k): str(v) for k, v in (config.get("headers") or {}).items()}
        return context

    @abc.abstractmethod
    async def _open(self, config: dict[str, Any]) -> None:
        """Read the executor's own options and open its client."""

    # ------------------------------------------------------------ runs

    async def submit(self, run: RunAttempt) -> None:
        """Hand the attempt to the service. A requeued attempt follows a lost one (the
        service was killed or restarted), so an unreachable service is retried for up to
        REQUEUE_WAIT seconds: a restart is waited for, a dead service still fails."""
        await retrying(functools.partial(self._submit, run), errors=(BackendUnavailableError,),
                       budget=REQUEUE_WAIT if run.attempt > 1 else 0.0, delay=0.1, cap=1.0)

    @abc.abstractmethod
    async def _submit(self, run: RunAttempt) -> None:
        """One try at handing the attempt over."""

    def _new_flight(self, run: RunAttempt) -> _Flight:
        flight = _Flight(run)
        self._flights[run.run_id] = flight
        return flight

    def _current(self, flight: _Flight) -> bool:
        return self._flights.get(flight.run.run_id) is flight

    async def _until_accepted(self, flight: _Flight) -> None:
        """Wait for the service to take the request (bounded by ACCEPT_WAIT); a failure
        before that is raised here, so the dispatcher fails the run naming the address."""
        assert flight.task is not None
        try:
            await asyncio.wait({flight.accepted, flight.task}, timeout=ACCEPT_WAIT,
                               return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            flight.task.cancel()
            self._drop(flight)
            raise
        flight.returned = True
        if flight.accepted.done() and flight.accepted.exception() is not None:
            self._drop(flight)
            raise flight.accepted.exception()  # type: ignore[misc]

    def _drop(self, flight: _Flight) -> None:
        if self._current(flight):
            del self._flights[flight.run.run_id]

    def _fail(self, flight: _Flight, error: BaseException) -> None:
        """The run ends with ``error``: raised from submit while it waits, else an event."""
        if flight.finished:
            return
        if not flight.returned and not flight.accepted.done():
            flight.accepted.set_exception(error)
            return
        if not self._current(flight):
            return
        flight.finished = True
        self._send(frames.error_event(
            flight.run.run_id, flight.run.task_id, error, attempt=flight.attempt,
            source="transport",
        ))

    def _lost(self, flight: _Flight, reason: str) -> None:
        """The run's connection or stream ended without its outcome: the dispatcher
        applies the orphan policy. Before submit returned it is a failed submission."""
        if flight.finished:
            return
        if not flight.returned and not flight.accepted.done():
            flight.accepted.set_exception(self._unavailable(reason))
            return
        if not self._current(flight):
            return
        flight.finished = flight.lost = True
        self._send(frames.event(
            frames.TASK_LOST, flight.run.run_id, flight.run.task_id, flight.attempt,
            reason=reason,
        ))

    def _unavailable(self, text: str, cause: BaseException | None = None) -> BaseException:
        error = BackendUnavailableError(
            f"{self.where}: could not hand the run to the worker service at "
            f"{self._address}: {text}; check executor_config.{self.address_key} and that "
            "`wove-adapters serve` is running there",
            environment=self._environment, executor=self.name, address=self._address,
            setting=f"executor_config.{self.address_key}",
        )
        error.__cause__ = cause
        return error

    def _refused(self, status: str, detail: str) -> PayloadError:
        """The service refused the request itself: authentication, or what was sent."""
        detail = detail.strip()[:_QUOTE]
        return PayloadError(
            f"{self.where}: the worker service at {self._address} refused the request "
            f"({status}{': ' + detail if detail else ''}); executor_config.security must "
            "hold the secret (or bearer token) the service was started with"
        )

    def _send(self, frame: dict[str, Any]) -> None:
        assert self._emit is not None
        self._emit(frame)

    def _deliver(self, flight: _Flight, raw: Mapping[str, Any]) -> None:
        """One verified event of ``flight``'s run, as our frame."""
        if flight.finished or not self._current(flight):
            return
        frame = event_from_wire(
            raw, flight.run.run_id, flight.run.task_id, flight.attempt, where=self.where
        )
        if frame is None:
            return
        kind = frame["type"]
        if kind in frames.TERMINAL_EVENTS:
            flight.finished = True
        elif kind == frames.TASK_STARTED and flight.cancel_requested and not flight.recancelled:
            # The cancel overtook the run on its way in (the service did not know it
            # yet): ask again now that it runs.
            flight.recancelled = True
            asyncio.get_running_loop().create_task(self._recancel(flight))
        self._send(frame)

    def _deliver_all(self, flight: _Flight, events: list[dict[str, Any]]) -> None:
        for raw in events:
            self._deliver(flight, raw)

    async def _recancel(self, flight: _Flight) -> None:
        with contextlib.suppress(Exception):
            await self.cancel(flight.run, mode=flight.run.policy.cancel_mode)

    async def cancel(self, run: RunAttempt, *, mode: str) -> None:
        flight: _Flight | None = self._flights.get(run.run_id)
        if flight is not None and flight.attempt == run.attempt:
            if flight.lost and run.policy.orphan_policy == "requeue":
                # The dispatcher clears a lost attempt before it sends the run again
                # under the same run id. The service already let go of it (its
                # connection closed: cancelled, or kept running under its idempotency
                # key for the requeue to attach to); a cancel_task now would be
                # remembered against that run id and cancel the requeued attempt.
                return
            flight.cancel_requested = True
        else:
            flight = None
        events = await self._cancel(run, mode)
        if flight is not None:
            self._deliver_all(flight, events)

    @abc.abstractmethod
    async def _cancel(self, run: RunAttempt, mode: str) -> list[dict[str, Any]]:
        """Send ``cancel_task``; the verified, still-pickled events of the answer."""

    async def release(self, run: RunAttempt) -> None:
        flight = self._flights.get(run.run_id)
        if flight is not None and flight.attempt == run.attempt:
            del self._flights[run.run_id]
            self._forget(flight)
            if flight.task is not None and not flight.task.done():
                flight.task.cancel()

    def _forget(self, flight: _Flight) -> None:
        """Drop per-connection state of a released flight (websocket)."""

    async def _stop_flights(self) -> None:
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        self._flights.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _auth_nonce(security: netwire.Security, auth: dict[str, str]) -> tuple[dict[str, str], str]:
    """The request's nonce (signed mode: the signature's; bearer: a fresh one sent in
    ``X-Wove-Nonce``, which the answer's signature must name)."""
    nonce = auth.get(netwire.HEADERS["nonce"])
    if nonce:
        return auth, nonce
    nonce = secrets.token_urlsafe(18)
    return {**auth, netwire.HEADERS["nonce"]: nonce}, nonce


def _quote(data: bytes) -> str:
    text = data[:_QUOTE].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        loaded = json.loads(data)
        if isinstance(loaded, dict) and loaded.get("error"):
            text = str(loaded["error"])[:_QUOTE]
    return text


def _unreachable_error(exc: BaseException) -> bool:
    """aiohttp's connector errors, ConnectionError and TimeoutError are all OSErrors
    (asyncio.TimeoutError only from Python 3.11)."""
    return isinstance(exc, (OSError, asyncio.TimeoutError))


# ---------------------------------------------------------------- http / https


class HttpTransport(NetworkTransport):
    """``http``: one streamed POST per run (NDJSON answer, one signed line per message);
    ``cancel_task`` is a POST of its own."""

    name = "http"
    config_struct = HttpOptions

    def __init__(self) -> None:
        super().__init__()
        self._cancel_timeout = CANCEL_TIMEOUT

    async def _open(self, config: dict[str, Any]) -> None:
        import aiohttp

        context = await self._open_url(
            config, ("http", "https"), "https://workers.example:8443/",
            tls_hint="use an https:// URL (wove-adapters serve --transport https)",
        )
        timeout = config.get("timeout")
        read = float(timeout) if timeout is not None else None
        self._cancel_timeout = read or CANCEL_TIMEOUT
        self._session = aiohttp.ClientSession(
            # One connection per run in flight: the dispatcher's caps bound them, not a pool.
            connector=aiohttp.TCPConnector(limit=0, ssl=context if context else True),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=read or CONNECT_TIMEOUT, sock_read=read
            ),
            auto_decompress=False,
        )

    def _request(self, frame: dict[str, Any], accept: str) -> tuple[bytes, dict[str, str], str]:
        body = netwire.dump_message(frame)
        auth, nonce = _auth_nonce(
            self._security, self._security.headers_for("http", self._target, body)
        )
        headers = {
            **self._headers,
            "Content-Type": "application/json",
            "Accept": accept,
            netwire.SIGNED_ANSWER_HEADER: "1",
            **auth,
        }
        return body, headers, nonce

    async def _submit(self, run: RunAttempt) -> None:
        body, headers, nonce = self._request(run.task_frame(), "application/x-ndjson")
        flight = self._new_flight(run)
        flight.task = asyncio.get_running_loop().create_task(
            self._follow(flight, body, headers, nonce)
        )
        await self._until_accepted(flight)

    async def _follow(
        self, flight: _Flight, body: bytes, headers: dict[str, str], nonce: str
    ) -> None:
        import aiohttp

        try:
            response = await self._session.post(self._url, data=body, headers=headers)
        except Exception as exc:
            self._fail(flight, self._unavailable(f"{type(exc).__name__}: {exc}", exc))
            return
        async with response:
            if response.status != 200:
                detail = _quote(await response.content.read(_QUOTE * 4))
                self._fail(flight, self._status_error(response.status, detail))
                return
            flight.accept()
            try:
                if response.content_type == "application/x-ndjson":
                    while not flight.finished:
                        line = await response.content.readuntil(b"\n", max_size=MAX_MESSAGE)
                        if not line:
                            break
                        if line.strip():
                            self._deliver_all(
                                flight, signed_events(self._security, "http", nonce, line)
                            )
                else:  # a plain (unary) answer, signed in its headers
                    data = await response.read()
                    self._deliver_all(
                        flight, answer_events(self._security, "http", nonce, response.headers, data)
                    )
            except AnswerError as exc:
                self._fail(flight, AnswerError(f"{self.where}: {self._url}: {exc}"))
                return
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
                self._lost(flight, f"the connection to the worker service at {self._url} "
                                   f"broke before the run's outcome ({type(exc).__name__}: "
                                   f"{exc})")
                return
        self._lost(flight, f"the worker service at {self._url} ended the run's stream "
                           "without its outcome (was it stopped or restarted?)")

    def _status_error(self, status: int, detail: str) -> BaseException:
        if status in (401, 403):
            return self._refused(f"HTTP {status}", detail)
        if status in (502, 503, 504):
            return self._unavailable(f"HTTP {status} {detail}".strip())
        return PayloadError(
            f"{self.where}: the worker service at {self._url} answered HTTP {status}"
            f"{': ' + detail if detail else ''}"
        )

    async def _cancel(self, run: RunAttempt, mode: str) -> list[dict[str, Any]]:
        import aiohttp

        body, headers, nonce = self._request(cancel_frame(run, mode), "application/json")
        try:
            async with self._session.post(
                self._url, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self._cancel_timeout),
            ) as response:
                data = await response.read()
                if response.status != 200:
                    raise self._status_error(response.status, _quote(data))
                return answer_events(self._security, "http", nonce, response.headers, data)
        except aiohttp.ClientError as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}", exc) from exc

    async def aclose(self) -> None:
        await self._stop_flights()
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpsTransport(HttpTransport):
    """``https``: ``http`` that refuses anything but an https:// URL."""

    name = "https"

    def _checked_url(self, config: dict[str, Any], schemes: tuple[str, ...], example: str) -> str:
        url = super()._checked_url(config, schemes, example)
        if urllib.parse.urlsplit(url).scheme != "https":
            raise self._refuse("url", f"the https executor needs an https:// URL, not "
                               f"{url!r} (or use executor 'http')")
        return url


# ---------------------------------------------------------------- websocket


class _Socket:
    """One websocket to the service and the runs it carries. Authenticated at the
    handshake; every message both ways is signed (answers bound to the handshake nonce)."""

    def __init__(self, ws: Any, nonce: str) -> None:
        self.ws = ws
        self.nonce = nonce
        self.flights: dict[str, _Flight] = {}
        self.reader: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.closed = False


class WebSocketTransport(NetworkTransport):
    """``websocket``: one connection per transport, opened on first use and again after
    it dropped (every run it carried is then reported lost)."""

    name = "websocket"
    config_struct = WebSocketOptions

    def __init__(self) -> None:
        super().__init__()
        self._ssl: ssl.SSLContext | None = None
        self._socket: _Socket | None = None
        self._connecting = asyncio.Lock()

    async def _open(self, config: dict[str, Any]) -> None:
        import aiohttp

        self._ssl = await self._open_url(config, ("ws", "wss"), "wss://workers.example:8443/",
                                         tls_hint="use a wss:// URL")
        given = config.get("open_timeout")
        open_timeout = CONNECT_TIMEOUT if given is None else float(given)
        # The handshake is bounded by open_timeout (connect, then its answer); after the
        # upgrade aiohttp lifts the read bound and pings watch the peer.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=open_timeout, sock_read=open_timeout
            ),
        )

    async def _connection(self) -> _Socket:
        async with self._connecting:
            if self._socket is not None and not self._socket.closed:
                return self._socket
            import aiohttp

            auth, nonce = _auth_nonce(
                self._security, self._security.headers_for("websocket", self._target, b"")
            )
            headers = {**self._headers, netwire.SIGNED_ANSWER_HEADER: "1", **auth}
            try:
                ws = await self._session.ws_connect(
                    self._url, headers=headers, ssl=self._ssl if self._ssl else True,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    heartbeat=WS_PING_SECONDS, max_msg_size=0, autoping=True,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (401, 403):
                    raise self._refused(f"HTTP {exc.status}", exc.message) from None
                raise self._unavailable(f"handshake failed: HTTP {exc.status} {exc.message}",
                                        exc) from exc
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise self._unavailable(f"{type(exc).__name__}: {exc}", exc) from exc
            sock = _Socket(ws, nonce)
            sock.reader = asyncio.get_running_loop().create_task(self._read(sock))
            self._socket = sock
            return sock

    async def _send_frame(self, sock: _Socket, frame: dict[str, Any]) -> None:
        body = netwire.dump_message(frame)
        sig = self._security.headers_for("websocket", self._target, body)
        message = json.dumps({"body": body.decode("utf-8"), "sig": sig}, separators=(",", ":"))
        async with sock.lock:
            await sock.ws.send_str(message)

    async def _submit(self, run: RunAttempt) -> None:
        frame = run.task_frame()
        netwire.encode_frame(frame)  # an unpicklable argument fails here, before sending
        sock = await self._connection()
        flight = self._new_flight(run)
        sock.flights[run.run_id] = flight
        try:
            await self._send_frame(sock, frame)
        except asyncio.CancelledError:
            self._drop(flight)
            raise
        except Exception as exc:
            self._drop(flight)
            sock.flights.pop(run.run_id, None)
            if _unreachable_error(exc):
                raise self._unavailable(f"{type(exc).__name__}: {exc}", exc) from exc
            raise
        flight.returned = True
        flight.accept()

    async def _read(self, sock: _Socket) -> None:
        import aiohttp

        why = "it closed"
        try:
            async for message in sock.ws:
                if message.type != aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    events = signed_events(self._security, "websocket", sock.nonce, message.data)
                except AnswerError as exc:
                    error = AnswerError(f"{self.where}: {self._url}: {exc}")
                    for flight in list(sock.flights.values()):
                        self._fail(flight, error)
                    why = f"an answer failed verification ({exc})"
                    break
                for raw in events:
                    owner = sock.flights.get(str(raw.get("run_id")))
                    if owner is not None:
                        self._deliver(owner, raw)
            else:
                code = sock.ws.close_code
                why = f"it closed (code {code})" if code is not None else "it closed"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        finally:
            sock.closed = True
            if self._socket is sock:
                self._socket = None
        with contextlib.suppress(Exception):
            await sock.ws.close()
        for flight in list(sock.flights.values()):
            self._lost(flight, f"the websocket to the worker service at {self._url} was "
                               f"lost before the run's outcome: {why}")
        sock.flights.clear()

    def _forget(self, flight: _Flight) -> None:
        sock = self._socket
        if sock is not None and sock.flights.get(flight.run.run_id) is flight:
            del sock.flights[flight.run.run_id]

    async def _cancel(self, run: RunAttempt, mode: str) -> list[dict[str, Any]]:
        """On the websocket the cancel's answer (task_cancelled) arrives as the run's own
        events; nothing to return here."""
        sock = self._socket
        if sock is None or sock.closed:
            if run.run_id in self._flights:
                raise self._unavailable("the websocket is closed")
            return []
        try:
            await self._send_frame(sock, cancel_frame(run, mode))
        except (ConnectionError, RuntimeError, OSError) as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}", exc) from exc
        return []

    async def aclose(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.flights.clear()
            with contextlib.suppress(Exception):
                await sock.ws.close()
            if sock.reader is not None:
                sock.reader.cancel()
                await asyncio.gather(sock.reader, return_exceptions=True)
        await self._stop_flights()
        if self._session is not None:
            await self._session.close()
            self._session = None

