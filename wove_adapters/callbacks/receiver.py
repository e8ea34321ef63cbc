"""The caller's HTTP receiver for worker events: ``POST /wove/events/{token}``.

Built on aiohttp.web. Every request is checked in order of cost before anything is
decoded: path token, size, signature, timestamp window, nonce (no replay), then the event
schema. Anything wrong gets a 4xx and changes nothing; one bad request never blocks or
crashes the others. Verified events are routed by ``run_id`` to whoever registered the
run; a second terminal event for a run is dropped and counted. A batch with events for a
run nobody here registered is answered ``404 {"unknown": [run ids]}`` (the known ones
are routed): a restarted caller on the same port and token must not swallow the old runs'
outcomes, which their workers then record in the ledger instead.

One receiver per (host, port, token) per process, shared by every environment and Hub,
so a short-lived caller pays for the listening socket once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from wove_adapters.core import frames, signing
from wove_adapters.core.errors import PayloadError
from wove_adapters.worker.sender import UNKNOWN_RUN_STATUS

EventSink = Callable[[frames.WireEvent, bytes], None]
DEFAULT_MAX_BODY = 512 * 1024 * 1024
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
    ) -> None:
        self.host = host
        self.port = port
        self.token = token or secrets.token_urlsafe(18)
        self._public_url = public_url
        self.max_body = max_body
        self.nonces = signing.NonceCache(window)
        self.window = window
        self._sinks: dict[str, EventSink] = {}
        self._terminal_seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._runner: Any = None
        self._site: Any = None
        self.stats: dict[str, int] = {
            "accepted": 0,
            "rejected": 0,
            "duplicates_dropped": 0,
            "unrouted": 0,
            "unknown_runs": 0,
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

        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/wove/events/{token}", self._handle)
        app.router.add_get("/wove/health", self._health)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise _address_error(exc, self.host, self.port, environment) from exc
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._runner = runner
        self._site = site
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def register(self, run_id: str, sink: EventSink) -> None:
        self._sinks[run_id] = sink

    def unregister(self, run_id: str) -> None:
        self._sinks.pop(run_id, None)

    async def _health(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"ok": True, **self.stats})

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        if not secrets.compare_digest(request.match_info["token"], self.token):
            return self._reject(404, "unknown callback token")
        if request.content_length is not None and request.content_length > self.max_body:
            return self._reject(413, "body too large")
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "body too large")
        except Exception:
            return self._reject(400, "unreadable body")
        try:
            blob = signing.decode_blob(data)
            body = signing.verify(blob, window=self.window, nonces=self.nonces)
            batch = msgspec.msgpack.decode(body, type=frames.EventBatch)
        except PayloadError as exc:
            status = (
                409
                if "replayed" in str(exc)
                else 401
                if "signature" in str(exc) or "key" in str(exc) or "timestamp" in str(exc)
                else 400
            )
            return self._reject(status, str(exc))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return self._reject(400, f"malformed events: {exc}")
        routed, unknown = self.route(batch.events, data)
        self.stats["accepted"] += 1
        if unknown:
            # Not 200: a worker must not count these as delivered. Nobody here follows
            # those runs (this caller restarted on the same port and token, or they
            # ended here long ago), so the worker records them in the run's ledger,
            # where whoever holds the run id fetches them.
            self.stats["unknown_runs"] += len(unknown)
            return web.json_response(
                {
                    "ok": False,
                    "error": "no run with these ids is followed here",
                    "unknown": unknown,
                    "routed": routed,
                },
                status=UNKNOWN_RUN_STATUS,
            )
        return web.json_response({"ok": True, "events": len(batch.events), "routed": routed})

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
            sink = self._sinks.get(event.run_id)
            if sink is None:
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
                sink(event, raw)
                routed += 1
            except Exception:
                self.stats["unrouted"] += 1
                log.exception("the sink of run %s failed on a %s event", event.run_id,
                              type(event).__struct_config__.tag)
        return routed, unknown

    def _reject(self, status: int, reason: str) -> Any:
        from aiohttp import web

        self.stats["rejected"] += 1
        return web.json_response({"ok": False, "error": reason}, status=status)


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
            receiver = CallbackReceiver(host=host, port=port, token=token, public_url=public)
            await receiver.start(environment=environment)
            _receivers[ident] = receiver
            from wove_adapters.core.loop import add_shutdown_hook

            add_shutdown_hook(receiver.aclose)
        return receiver
