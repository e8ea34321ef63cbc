"""The caller's HTTP receiver for worker events: ``POST /wove/events/{token}``.

Built on aiohttp's low-level server. Every request is checked in order of cost before
anything is decoded: path token, size, signature (only keys this process holds, never a
key file read on the loop), timestamp window, nonce (no replay), the event schema, then
the key binding: each event's run must have been signed with the key that signed the
batch. Anything wrong gets a 4xx and changes nothing; one bad request never blocks or
crashes the others. Verified events are routed by ``run_id`` to whoever registered the
run; a second terminal event for a run is dropped and counted.

It stays up under abuse: a connection must deliver a request's headers within
``header_timeout`` seconds (of connecting, or of its previous answer) and its body within
``body_timeout``; at most ``max_connections`` are open (a new one closes the longest-idle
one, or is refused when every one is mid-request); bodies above ``max_body`` (events, not
bulk data) are refused, at most ``large_reads`` bodies above ``LARGE_BODY`` are read at
once, and large bodies are verified off the event loop. See docs/security.md, "Limits".

A batch with events for a run nobody here registered is answered
``404 {"unknown": [run ids]}`` (the known ones are routed): a restarted caller on the
same port and token must not swallow the old runs' outcomes, which their workers then
record in the ledger instead.

One receiver per (host, port, token) per process, shared by every environment and Hub,
so a short-lived caller pays for the listening socket once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import resource
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from wove_adapters.core import frames, observe, signing
from wove_adapters.core.errors import PayloadError
from wove_adapters.worker.sender import UNKNOWN_RUN_STATUS

EventSink = Callable[[frames.WireEvent, bytes], None]
# Events are small; a large value rides inside a task_result (pickled), so the limit is
# generous for events and still far from what a flood of bodies could make us hold
# (executor_config.callback_max_body). A worker whose result is refused as too large
# records it in the run's ledger, where the caller finds it (see docs/security.md).
DEFAULT_MAX_BODY = 16 * 1024 * 1024
# Bodies above this are read a few at a time (``large_reads``) and verified (HMAC,
# msgpack) in a thread: the loop never spends milliseconds on one request.
LARGE_BODY = 1024 * 1024
VERIFY_IN_THREAD = 256 * 1024
HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
LARGE_READS = 4
ACCEPT_BACKLOG = 128
# A signed, valid batch with events for runs nobody here follows gets UNKNOWN_RUN_STATUS;
# the body lists them (``{"unknown": [run ids]}``) so the worker records those outcomes
# in the ledger (see worker.sender).
log = logging.getLogger("wove_adapters.receiver")


class CallbackAddressError(OSError):
    """The receiver cannot listen where it is configured to (port taken, address not on
    this host). An OSError still, with the original error as its cause."""


class CallbackReceiver:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        public_url: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        window: float = signing.DEFAULT_WINDOW_SECONDS,
        max_connections: int | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(18)
        self._public_url = public_url
        self.max_body = max_body
        self.nonces = signing.NonceCache(window)
        self.window = window
        # Read when used, so a test (or an operator in a REPL) may change them live.
        self.header_timeout = HEADER_TIMEOUT
        self.body_timeout = BODY_TIMEOUT
        self.max_connections = max_connections or default_max_connections()
        self.large_reads = LARGE_READS
        self._sinks: dict[str, tuple[EventSink, str | None]] = {}
        # Runs carried by a chunk (one backend job for several runs), and the runs of
        # each chunk the caller cancelled: the answer to any batch from that chunk names
        # them, so its worker never starts them (see ``worker.chunks``).
        self._chunk_of: dict[str, str] = {}
        self._skips: dict[str, set[str]] = {}
        self._terminal_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        # Open connections, least recently active first, and those mid-request.
        self._connections: OrderedDict[Any, float] = OrderedDict()
        self._busy: set[Any] = set()
        self._large: asyncio.Semaphore | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._runner: Any = None
        self._site: Any = None
        self.stats: dict[str, int] = {
            "accepted": 0,
            "rejected": 0,
            "duplicates_dropped": 0,
            "unrouted": 0,
            "unknown_runs": 0,
            "wrong_key": 0,
            "too_large": 0,
            "timed_out": 0,
            "idle_closed": 0,
            "connections_evicted": 0,
            "connections_refused": 0,
            "malformed": 0,
        }
        self.ready = asyncio.Event()

    @property
    def url(self) -> str:
        """The full callback URL a worker POSTs to (token included)."""
        base = self._public_url or f"http://{self.host}:{self.port}"
        base = base.rstrip("/")
        if "{token}" in base:
            return base.replace("{token}", self.token)
        if base.endswith("/wove/events"):
            return f"{base}/{self.token}"
        return f"{base}/wove/events/{self.token}"

    async def start(self, *, environment: str | None = None) -> None:
        """Listen. ``environment`` only names who asked, in the error when it cannot."""
        from aiohttp import web

        server = _server_class()(
            self._dispatch,
            receiver=self,
            keepalive_timeout=self.header_timeout,
            access_log=None,
            logger=_ServerLog(self),
        )
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        # asyncio accepts up to ``backlog`` connections in one go, before any of them
        # reaches the cap: kept small, a flood cannot run the process out of descriptors.
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=ACCEPT_BACKLOG)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise _address_error(exc, self.host, self.port, environment) from exc
        if self.port == 0:
            listening = site._server
            assert listening is not None
            self.port = listening.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._runner = runner
        self._site = site
        self._large = asyncio.Semaphore(self.large_reads)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        self.ready.set()

    async def pause(self) -> None:
        """Stop listening (tests: an unreachable receiver); registrations are kept.

        Open keep-alive connections are closed too (once their current request is
        answered): a warm worker would otherwise keep reaching a "paused" receiver."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
            server = getattr(self._runner, "server", None)
            if server is not None and hasattr(server, "shutdown"):
                await server.shutdown(1.0)

    async def resume(self) -> None:
        """Listen again on the same port."""
        from aiohttp import web

        if self._site is None and self._runner is not None:
            self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
            await self._site.start()

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(BaseException):
                await self._sweeper
            self._sweeper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(
        self, run_id: str, sink: EventSink, *, key_id: str | None = None,
        chunk: str | None = None,
    ) -> None:
        """Route ``run_id``'s events to ``sink``. ``key_id``: the key that signed the run's
        payload; its events are accepted only under that key (None: any key this process
        holds, for callers that sign nothing themselves). ``chunk``: the chunk carrying
        the run, if any (see ``skip_in_chunk``)."""
        self._sinks[run_id] = (sink, key_id or None)
        if chunk is not None:
            self._chunk_of[run_id] = chunk

    def unregister(self, run_id: str) -> None:
        self._sinks.pop(run_id, None)
        self._chunk_of.pop(run_id, None)

    def skip_in_chunk(self, chunk: str, run_id: str) -> None:
        """The caller cancelled ``run_id``, which waits inside ``chunk``: say so in the
        answer to the chunk's next batch of events, so its worker never starts it."""
        self._skips.setdefault(chunk, set()).add(run_id)

    def forget_chunk(self, chunk: str) -> None:
        """Every run of ``chunk`` ended here: nothing more to tell its worker."""
        self._skips.pop(chunk, None)

    def _skips_for(self, events: list[frames.WireEvent]) -> list[str]:
        chunks = {self._chunk_of.get(event.run_id) for event in events}
        return sorted({run_id for chunk in chunks if chunk for run_id in
                       self._skips.get(chunk, ())})

    # ------------------------------------------------------------ connections

    def connected(self, handler: Any) -> None:
        """A new connection: within the cap, or it takes the place of the one idle the
        longest (an idle flood must not lock workers out), or, when every connection is
        mid-request, it is closed at once."""
        self._connections[handler] = asyncio.get_running_loop().time()
        if len(self._connections) <= self.max_connections:
            return
        for other in self._connections:
            if other is not handler and other not in self._busy:
                self.stats["connections_evicted"] += 1
                self._close(other)
                return
        self.stats["connections_refused"] += 1
        self._close(handler)

    def disconnected(self, handler: Any) -> None:
        self._connections.pop(handler, None)
        self._busy.discard(handler)

    def _close(self, handler: Any) -> None:
        self._connections.pop(handler, None)
        handler.force_close()

    async def _sweep(self) -> None:
        """Close connections that have not sent a whole request's headers in time
        (idle keep-alives included: a worker simply reconnects)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.header_timeout / 4))
            horizon = loop.time() - self.header_timeout
            for handler, since in list(self._connections.items()):
                if since > horizon:
                    break  # least recently active first: the rest are newer
                if handler not in self._busy:
                    self.stats["idle_closed"] += 1
                    self._close(handler)

    async def _dispatch(self, request: Any) -> Any:
        from aiohttp import web

        handler = request.protocol
        self._busy.add(handler)
        try:
            path = request.path
            if path.startswith(_EVENTS) and "/" not in path[len(_EVENTS):]:
                if request.method != "POST":
                    return self._reject(405, "method", "POST events here")
                return await self._handle(request, path[len(_EVENTS):])
            if path == "/wove/health" and request.method in ("GET", "HEAD"):
                return web.json_response({"ok": True, **self.stats})
            return self._reject(404, "not_found", "not found")
        finally:
            self._busy.discard(handler)
            if handler in self._connections:
                self._connections[handler] = asyncio.get_running_loop().time()
                self._connections.move_to_end(handler)

    # ------------------------------------------------------------ events

    async def _handle(self, request: Any, token: str) -> Any:
        from aiohttp import web

        # Bytes, not str: compare_digest refuses non-ASCII text (a 500 with a traceback).
        if not secrets.compare_digest(
            token.encode("utf-8", "surrogatepass"), self.token.encode("utf-8", "surrogatepass")
        ):
            return self._reject(404, "token", "unknown callback token")
        declared = request.content_length
        if declared is not None and declared > self.max_body:
            self.stats["too_large"] += 1
            return self._reject(413, "too_large", f"body too large (limit {self.max_body} bytes)")
        try:
            chunks = await self._read_body(request, declared)
        except _TooLarge:
            self.stats["too_large"] += 1
            return self._reject(413, "too_large", f"body too large (limit {self.max_body} bytes)")
        except asyncio.TimeoutError:
            self.stats["timed_out"] += 1
            return self._reject(408, "timeout", f"body not received within {self.body_timeout:g}s")
        except Exception:
            return self._reject(400, "unreadable", "unreadable body")
        try:
            if sum(map(len, chunks)) > VERIFY_IN_THREAD:
                data, key_id, batch = await asyncio.to_thread(self._open_chunks, chunks)
            else:
                data, key_id, batch = self._open_chunks(chunks)
        except PayloadError as exc:
            return self._reject(*refusal(exc), str(exc))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return self._reject(400, "malformed", f"malformed events: {exc}")
        wrong = self.unbound(batch.events, key_id)
        if wrong:
            self.stats["wrong_key"] += 1
            return self._reject(
                401, "wrong_key", f"signed with key {key_id}, not with the key of run {wrong[0]}"
            )
        skip = self._skips_for(batch.events) if self._skips else []
        routed, unknown = self.route(batch.events, data)
        self.stats["accepted"] += 1
        if unknown:
            # Not 200: a worker must not count these as delivered. Nobody here follows
            # those runs (this caller restarted on the same port and token, or they
            # ended here long ago), so the worker records them in the run's ledger,
            # where whoever holds the run id fetches them.
            self.stats["unknown_runs"] += len(unknown)
            if observe.observers:
                observe.receiver_rejected("unknown_run")
            return web.json_response(
                {
                    "ok": False,
                    "error": "no run with these ids is followed here",
                    "unknown": unknown,
                    "routed": routed,
                    **({"skip": skip} if skip else {}),
                },
                status=UNKNOWN_RUN_STATUS,
            )
        answer: dict[str, Any] = {"ok": True, "events": len(batch.events), "routed": routed}
        if skip:
            answer["skip"] = skip
        return web.json_response(answer)

    async def _read_body(self, request: Any, declared: int | None) -> list[bytes]:
        """The whole body within ``body_timeout`` (waiting for a large-body slot
        included), never more than ``max_body`` bytes of it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        if not request.can_read_body:
            return []
        if declared is not None and declared <= LARGE_BODY:
            return await asyncio.wait_for(self._read_limited(request), self.body_timeout)
        assert self._large is not None
        await asyncio.wait_for(self._large.acquire(), self.body_timeout)
        try:
            left = max(deadline - loop.time(), 0.0)
            return await asyncio.wait_for(self._read_limited(request), left)
        finally:
            self._large.release()

    async def _read_limited(self, request: Any) -> list[bytes]:
        """The body as it came, in chunks (joined later, off the loop when large)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return chunks
            chunks.append(chunk)
            size += len(chunk)
            if size > self.max_body:
                raise _TooLarge

    def _open_chunks(self, chunks: list[bytes]) -> tuple[bytes, str, frames.EventBatch]:
        data = b"".join(chunks)
        return (data, *self.open_batch(data))

    def open_batch(self, data: bytes) -> tuple[str, frames.EventBatch]:
        """Verify a signed batch with the keys this process holds (no key file is read:
        this runs on the loop) and decode it: ``(the signing key id, the batch)``."""
        blob = signing.decode_blob(data)
        body = signing.verify(blob, window=self.window, nonces=self.nonces, load=False)
        return blob.key_id, msgspec.msgpack.decode(body, type=frames.EventBatch)

    def unbound(self, events: list[frames.WireEvent], key_id: str) -> list[str]:
        """The runs among ``events`` registered under another key than ``key_id``: a
        batch with any of them is refused whole (nothing routed, nothing unpickled)."""
        wrong: list[str] = []
        for event in events:
            found = self._sinks.get(event.run_id)
            if found is not None and found[1] is not None and found[1] != key_id:
                wrong.append(event.run_id)
        return wrong

    def route(self, events: list[frames.WireEvent], raw: bytes) -> tuple[int, list[str]]:
        """Hand verified events to their runs' sinks; drop duplicate terminals. Returns
        how many were routed and the ids of runs that nobody here registered (a
        duplicate of a terminal event already routed is neither)."""
        routed = 0
        unknown: list[str] = []
        for event in events:
            terminal = isinstance(
                event, (frames.TaskResult, frames.TaskError, frames.TaskCancelled)
            )
            ident = (event.run_id, event.attempt)
            if terminal and ident in self._terminal_seen:
                self.stats["duplicates_dropped"] += 1
                continue
            found = self._sinks.get(event.run_id)
            if found is None:
                self.stats["unrouted"] += 1
                if event.run_id not in unknown:
                    unknown.append(event.run_id)
                continue
            if terminal:
                # Marked only once routed: a retry of an event refused as unknown must
                # be refused again, never swallowed as a "duplicate".
                self._terminal_seen[ident] = None
                if len(self._terminal_seen) > 100_000:
                    self._terminal_seen.popitem(last=False)
            try:
                found[0](event, raw)
                routed += 1
            except Exception:
                self.stats["unrouted"] += 1
                log.exception("the sink of run %s failed on a %s event", event.run_id,
                              type(event).__struct_config__.tag)
        return routed, unknown

    def _reject(self, status: int, label: str, reason: str) -> Any:
        """A 4xx answer; ``label`` names the reason among a fixed few, for metrics
        (``core.observe.receiver_rejected``)."""
        from aiohttp import web

        self.stats["rejected"] += 1
        if observe.observers:
            observe.receiver_rejected(label)
        return web.json_response({"ok": False, "error": reason}, status=status)


_EVENTS = "/wove/events/"


def refusal(exc: PayloadError) -> tuple[int, str]:
    """The HTTP status and the metrics reason of a batch that did not verify (the drop
    box counts its refusals by the same reasons)."""
    text = str(exc)
    if "replayed" in text:
        return 409, "replayed"
    if "signature" in text or "key" in text or "timestamp" in text:
        return 401, "signature"
    return 400, "malformed"


class _ServerLog(logging.LoggerAdapter):
    """aiohttp logs every malformed request with a traceback, so any peer could fill the
    caller's log: those are counted (``malformed``) and logged at debug. Anything else
    (a bug of ours) is logged as it comes."""

    def __init__(self, receiver: CallbackReceiver) -> None:
        super().__init__(logging.getLogger("wove_adapters.receiver.http"), {})
        self.receiver = receiver

    def exception(self, msg: object, *args: object, exc_info: Any = True,
                  **kwargs: Any) -> None:
        from aiohttp.http_exceptions import HttpProcessingError

        if isinstance(exc_info, HttpProcessingError):
            self.receiver.stats["malformed"] += 1
            if observe.observers:
                observe.receiver_rejected("malformed")
            self.logger.debug("malformed request refused: %s", str(exc_info).strip())
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)


class _TooLarge(Exception):
    """A body without a declared length grew past ``max_body``."""


def default_max_connections() -> int:
    """Open connections the receiver keeps: half the process's file descriptors (the
    rest are the caller's: its backends, ledger, workers' pipes), at most 1024. Beyond
    them ``accept`` would fail over and over (one logged traceback each time)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return 1024
    return max(16, min(1024, soft // 2))


@functools.cache
def _server_class() -> type:
    """aiohttp's low-level server, telling the receiver of every connection it opens
    and loses (the cap and the idle sweep need them)."""
    from aiohttp import web

    class CappedServer(web.Server):
        def __init__(self, handler: Any, *, receiver: CallbackReceiver, **kwargs: Any) -> None:
            super().__init__(handler, **kwargs)
            self.receiver = receiver

        def connection_made(self, handler: Any, transport: Any) -> None:
            super().connection_made(handler, transport)
            self.receiver.connected(handler)

        def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
            super().connection_lost(handler, exc)
            self.receiver.disconnected(handler)

    return CappedServer


def _address_error(
    exc: OSError, host: str, port: int, environment: str | None
) -> CallbackAddressError:
    who = f"Environment '{environment}'" if environment else "The callback receiver"
    if exc.errno == errno.EADDRINUSE:
        why = (
            "another process already listens there (an earlier caller still running, or "
            "another program). Set executor_config.callback_port to a free port, or to 0 "
            "(the default) to let the system pick one"
        )
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = (
            f"{host} is not an address of this host. Set executor_config.callback_host to "
            f"one of its addresses (127.0.0.1 for same-host workers, 0.0.0.0 for all)"
        )
    elif exc.errno == errno.EACCES:
        why = (
            "ports below 1024 need privileges. Set executor_config.callback_port to 1024 "
            "or above, or to 0 (the default)"
        )
    else:
        why = "check executor_config.callback_host and executor_config.callback_port"
    return CallbackAddressError(
        exc.errno,
        f"{who} cannot start its callback receiver on {host}:{port}: "
        f"{exc.strerror or exc} (errno {exc.errno}); {why}.",
    )


def max_body(config: dict[str, Any]) -> int:
    """``executor_config.callback_max_body`` (bytes), checked: the first environment
    to start the shared receiver sets it."""
    value = config.get("callback_max_body")
    if value is None:
        return DEFAULT_MAX_BODY
    if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
        raise ValueError(
            f"executor_config 'callback_max_body' must be a number of bytes >= 1024, "
            f"not {value!r}"
        )
    return value


_receivers: dict[tuple[str, int, str | None, str | None], CallbackReceiver] = {}
_lock: asyncio.Lock | None = None


async def get_receiver(
    config: dict[str, Any], *, environment: str | None = None
) -> CallbackReceiver:
    """The shared receiver for this executor_config's callback settings (started once).
    ``environment`` names who asked in a start-up error (CallbackAddressError)."""
    global _lock
    if _lock is None:
        _lock = asyncio.Lock()
    host = str(config.get("callback_host") or "127.0.0.1")
    port = int(config.get("callback_port") or 0)
    token = config.get("callback_token")
    public = config.get("callback_url")
    ident = (host, port, token, public)
    async with _lock:
        receiver = _receivers.get(ident)
        if receiver is None:
            receiver = CallbackReceiver(
                host=host, port=port, token=token, public_url=public,
                max_body=max_body(config),
            )
            await receiver.start(environment=environment)
            _receivers[ident] = receiver
            from wove_adapters.core.loop import add_shutdown_hook

            add_shutdown_hook(receiver.aclose)
        return receiver
