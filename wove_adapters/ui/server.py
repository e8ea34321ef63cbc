"""The runs page's HTTP server (aiohttp): the page, its JSON API, live updates, cancel,
and ``/metrics``, all read from one ledger.

Security, in the order a request meets it (docs/observability.md "UI"):

- It binds loopback unless told otherwise; a non-loopback address needs a token, and
  refuses to start without one. Without a token only loopback Host names are answered,
  so a web page that rebinds its own DNS name to 127.0.0.1 cannot read the runs.
- With a token every request must carry it: ``Authorization: Bearer TOKEN``, or the
  cookie set when the page is first opened as ``/?token=TOKEN`` (HttpOnly,
  SameSite=Strict; the redirect drops the token from the address bar).
- A POST must come from the page's own origin (its ``Origin``, else ``Referer``, names
  this server), so another site cannot make a logged-in browser cancel runs.
- The page's script writes run data with ``textContent`` only, under a Content Security
  Policy that allows this server's own script and nothing inline.

Cancel reaches a run in flight in this process (through its dispatcher), or the backend
job of a run submitted elsewhere when its environment is a backend adapter of the loaded
configuration and no other unfinished run shares the job (the ledger says which do); the
page opens one adapter per such environment and writes no outcome itself (the submitter
records what happened; docs/observability.md, "What cancel can reach").

Live updates are Server-Sent Events made by polling the ledger (``list_runs`` with the
page's filters, and ``get`` for the run whose detail is open) every ``poll_seconds``, so
they work the same on all four ledgers; only what changed is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.resources
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from aiohttp import web

from wove_adapters.adapters.base import BackendAdapter
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import CancelNotAcknowledgedError
from wove_adapters.core.ledger import TERMINAL_STATES, Ledger, RunRecord, open_ledger
from wove_adapters.core.netwire import is_loopback
from wove_adapters.core.runtime import Dispatcher
from wove_adapters.integration.environments import (
    open_backend_adapter,
    remote_cancel_reason,
    running_dispatchers,
    trusted_key_id,
)
from wove_adapters.ui import views

log = logging.getLogger("wove_adapters.ui")

DEFAULT_LISTEN: Final = "127.0.0.1:8766"
TOKEN_ENV: Final = "WOVE_ADAPTERS_UI_TOKEN"
TOKEN_COOKIE: Final = "wove_ui_token"
MIN_TOKEN_LENGTH: Final = 16
# The page, its script and its style: the only files served.
_STATIC: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_KEEPALIVE_SECONDS: Final = 15.0
# How long the list and the live rows reuse an answer to "who shares this job": finding
# sharers reads the environment's runs. A detail view and a cancel always ask afresh.
_SHARING_SECONDS: Final = 5.0
NOT_HERE: Final = (
    "not in flight in this process: the page can cancel runs of a Hub in the process that "
    "serves it (wove_adapters.ui.serve(hub=...)), and runs of a backend environment of its "
    "configuration that own their job alone; cancel it where it was submitted "
    "(Hub.cancel(run_id))"
)


class UIConfigError(ValueError):
    """The server was started wrongly; the message names the fix."""


@dataclass(frozen=True)
class UISettings:
    """How the server runs, checked (see ``check_settings``)."""

    host: str
    port: int
    token: str | None
    poll_seconds: float


def check_settings(
    listen: str, token: str | None, poll_seconds: float = 1.0
) -> UISettings:
    """Refuse a non-loopback address without a token, and a token too short to guess-proof."""
    from wove_adapters.worker.serve import ServeConfigError, parse_listen

    try:
        host, port = parse_listen(listen)
    except ServeConfigError as exc:
        raise UIConfigError(str(exc).replace(":8765", ":8766")) from None
    token = token or None
    if token is None and not is_loopback(host):
        raise UIConfigError(
            f"refusing to serve the runs page on non-loopback address {host} without a "
            f"token: pass --token TOKEN or set {TOKEN_ENV} (make one with: python -c "
            f"'import secrets; print(secrets.token_urlsafe(32))'), or listen on 127.0.0.1"
        )
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise UIConfigError(
            f"the UI token is {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
            f"(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not poll_seconds > 0:
        raise UIConfigError(f"poll_seconds must be above 0, not {poll_seconds!r}")
    return UISettings(host=host, port=port, token=token, poll_seconds=poll_seconds)


@functools.cache
def static_files() -> dict[str, bytes]:
    """The page's files, read once (``serve`` reads them before it enters the loop)."""
    package = importlib.resources.files("wove_adapters.ui") / "static"
    return {name: (package / name).read_bytes() for name in _STATIC}


def _same(presented: str | None, token: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), token.encode())


def _refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=_HEADERS)


class RunsPage:
    """The application: handlers over one ledger, and what may be cancelled from here."""

    def __init__(self, ledger: Ledger, settings: UISettings, config: Any,
                 reach: dict[str, tuple[str, str | None]] | None = None) -> None:
        self.ledger = ledger
        self.settings = settings
        self.config = config
        self.closing = asyncio.Event()
        self._static = static_files()
        # Per configured environment: its executor, and None when the page can cancel its
        # jobs through the adapter, else why not (``reach_of``).
        self.reach = reach or {}
        # One started adapter per environment the page has cancelled in, closed with it.
        self._adapters: dict[str, BackendAdapter] = {}
        self._opening = asyncio.Lock()
        # (environment, handle) -> (when asked, unfinished runs with that handle).
        self._sharers: dict[tuple[str, str], tuple[float, list[str]]] = {}

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=64 * 1024)
        app.router.add_get("/", self._page)
        app.router.add_get("/static/{name}", self._file)
        app.router.add_get("/api/runs", self._runs)
        app.router.add_get("/api/runs/{run_id}", self._run)
        app.router.add_post("/api/runs/{run_id}/cancel", self._cancel)
        app.router.add_get("/api/summary", self._summary)
        app.router.add_get("/api/events", self._events)
        app.router.add_get("/metrics", self._metrics)
        return app

    # ------------------------------------------------------------ security

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        token = self.settings.token
        if token is None:
            host = urlsplit(f"//{request.host}").hostname
            if not is_loopback(host):
                return _refuse(403, f"this server answers loopback names only, not {host!r}; "
                                    f"open it as http://127.0.0.1:{self.settings.port}/")
        else:
            offered = request.query.get("token")
            if offered is not None and request.method == "GET" and request.path == "/":
                if not _same(offered, token):
                    return _refuse(401, "wrong token")
                redirect = web.HTTPSeeOther("/", headers=_HEADERS)
                redirect.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict",
                                    path="/")
                raise redirect
            bearer = request.headers.get("Authorization", "")
            presented = (bearer[7:] if bearer.startswith("Bearer ") else None) or \
                request.cookies.get(TOKEN_COOKIE)
            if not _same(presented, token):
                return _refuse(401, "this server needs its token: open /?token=TOKEN once "
                                    "(a cookie keeps it), or send Authorization: Bearer TOKEN")
        if request.method not in ("GET", "HEAD") and not self._same_origin(request):
            return _refuse(403, "a POST must come from this page: its Origin (or Referer) "
                                f"must be http://{request.host}; a script sends that "
                                "Origin header itself")
        response = await handler(request)
        for name, value in _HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """The Origin (else the Referer) names this server's host and port. The scheme is
        not compared: behind a TLS proxy the browser says https while we see http, and a
        foreign page cannot choose the host its browser sends."""
        origin = request.headers.get("Origin") or request.headers.get("Referer")
        if not origin or origin == "null":
            return False
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == request.host

    # ------------------------------------------------------------ what may be cancelled

    def _owner(self, run_id: str) -> Dispatcher | None:
        """The dispatcher of this process that has the run in flight (it owns its job)."""
        for dispatcher in running_dispatchers():
            run = dispatcher.runs.get(run_id)
            if run is not None and not run.done.is_set():
                return dispatcher
        return None

    def _plain_note(self, record: RunRecord) -> tuple[str | None, bool]:
        """What the record and the configuration say alone: (None, False) when a
        dispatcher here has the run; (None, True) when its backend job may be cancelled
        from here if no other unfinished run shares it; else (why not, False)."""
        if record.state in TERMINAL_STATES:
            return f"the run has ended ({record.state})", False
        if self._owner(record.run_id) is not None:
            return None, False
        reach = self.reach.get(record.environment)
        if reach is None:
            return (f"{NOT_HERE}; its environment {record.environment!r} is not in this "
                    f"page's configuration (--config)"), False
        executor, reason = reach
        if reason is not None:
            return f"{NOT_HERE}; {reason}", False
        if record.adapter and record.adapter != executor:
            return (f"{NOT_HERE}; it was submitted with executor {record.adapter!r}, but "
                    f"this page's configuration says {executor!r}"), False
        if not record.submission:
            return "its backend has not given it a job yet; try again in a moment", False
        return None, True

    async def cancel_notes(
        self, records: list[RunRecord], *, fresh: bool = False
    ) -> list[str | None]:
        """For each record: None when the page may cancel it, else why not (the button's
        tooltip). A backend job is cancelled from here only when no other unfinished run
        shares it (a chunk's runs, callers following one idempotency key's job); without
        ``fresh`` an answer up to ``_SHARING_SECONDS`` old is reused."""
        plain = [self._plain_note(record) for record in records]
        remote = [r for r, (_, far) in zip(records, plain, strict=True) if far]
        shared = await asyncio.gather(*(self._sharing(r, fresh) for r in remote))
        notes = dict(zip((r.run_id for r in remote), shared, strict=True))
        return [notes[r.run_id] if far else note
                for r, (note, far) in zip(records, plain, strict=True)]

    async def _sharing(self, record: RunRecord, fresh: bool) -> str | None:
        assert record.submission is not None
        key = (record.environment, record.submission)
        now = time.monotonic()
        known = self._sharers.get(key)
        if fresh or known is None or now - known[0] > _SHARING_SECONDS:
            found = await self.ledger.unfinished_with_submission(*key)
            known = (now, [r.run_id for r in found])
            self._sharers = {k: v for k, v in self._sharers.items()
                             if now - v[0] <= _SHARING_SECONDS}
            self._sharers[key] = known
        others = [run_id for run_id in known[1] if run_id != record.run_id]
        if not others:
            return None
        return (f"its {record.adapter or 'backend'} job {record.submission} is shared with "
                f"unfinished run{'s' if len(others) > 1 else ''} {', '.join(others)} (a "
                f"chunk, or callers following one idempotency key): cancelling the job would "
                f"stop them too; cancel it where it was submitted (Hub.cancel(run_id))")

    async def _adapter(self, environment: str) -> BackendAdapter:
        async with self._opening:
            adapter = self._adapters.get(environment)
            if adapter is None:
                settings = self.config.environment_settings(environment)
                adapter = await open_backend_adapter(environment, settings)
                self._adapters[environment] = adapter
            return adapter

    async def aclose_adapters(self) -> None:
        adapters, self._adapters = list(self._adapters.values()), {}
        for adapter in adapters:
            try:
                await adapter.aclose()
            except Exception as exc:  # the others must still close
                log.warning("runs page: closing the %s adapter failed: %r", adapter.name, exc)

    # ------------------------------------------------------------ handlers

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html",
                            charset="utf-8")

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(body=self._static[name], content_type=_STATIC[name],
                            charset="utf-8")

    async def page_of(self, query: views.RunQuery) -> tuple[list[RunRecord], bool]:
        """A page of runs for ``query`` (after its cursor), and whether more may follow."""
        want = query.limit + len(query.seen)
        records = await self.ledger.list_runs(limit=want, **query.ledger_filters())
        more = len(records) == want
        return [r for r in records if r.run_id not in query.seen][: query.limit], more

    async def _runs(self, request: web.Request) -> web.Response:
        try:
            query = views.parse_query(request.query)
        except views.QueryError as exc:
            return _refuse(400, str(exc))
        page, more = await self.page_of(query)
        return web.json_response({
            "ledger": self.ledger.url,
            "runs": [views.run_json(r, note)
                     for r, note in zip(page, await self.cancel_notes(page), strict=True)],
            "next_cursor": views.encode_cursor(page, query) if page and more else None,
        })

    async def detail(self, record: RunRecord) -> dict[str, Any]:
        outcome = await asyncio.to_thread(self._outcome, record)
        (note,) = await self.cancel_notes([record], fresh=True)
        return views.detail_json(record, note, outcome)

    def _outcome(self, record: RunRecord) -> dict[str, Any]:
        # In a worker thread: resolving the environment's secret may read a key file.
        return views.outcome_json(record, trusted_key_id(self.config, record.environment))

    async def _run(self, request: web.Request) -> web.Response:
        record = await self.ledger.get(request.match_info["run_id"])
        if record is None:
            return _refuse(404, f"no run {request.match_info['run_id']!r} in {self.ledger.url}")
        return web.json_response(await self.detail(record))

    async def _cancel(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        record = await self.ledger.get(run_id)
        if record is None:
            return _refuse(404, f"no run {run_id!r} in {self.ledger.url}")
        (note,) = await self.cancel_notes([record], fresh=True)
        if note is not None:
            return _refuse(409, f"run {run_id} cannot be cancelled here: {note}")
        dispatcher = self._owner(run_id)
        if dispatcher is not None:
            try:
                await shared_loop.run_async(dispatcher.cancel(run_id))
            except CancelNotAcknowledgedError as exc:
                return _refuse(502, str(exc))
            log.info("runs page: cancelled run %s (%s)", run_id, request.remote)
            return web.json_response({"run_id": run_id, "cancel": "requested"}, status=202)
        return await self._cancel_job(record, request)

    async def _cancel_job(self, record: RunRecord, request: web.Request) -> web.Response:
        """Stop the job of a run submitted elsewhere through its environment's adapter.
        The submitting caller, if alive, learns of it on its own path (the worker's
        ``task_cancelled``, or reconciliation); the page writes no outcome (see
        docs/observability.md, "What cancel can reach")."""
        assert record.submission is not None
        executor = self.reach[record.environment][0]
        try:
            adapter = await self._adapter(record.environment)
            await adapter.cancel(record.submission, running=True)
        except Exception as exc:
            log.warning("runs page: cancel of %s job %s failed: %r", executor,
                        record.submission, exc)
            return _refuse(502, f"the {executor} backend did not take the cancel of job "
                                f"{record.submission} (run {record.run_id}): {exc}")
        log.info("runs page: cancelled %s job %s of run %s (%s)", executor, record.submission,
                 record.run_id, request.remote)
        return web.json_response({"run_id": record.run_id, "cancel": "requested",
                                  "job": record.submission}, status=202)

    async def _summary(self, request: web.Request) -> web.Response:
        counts = await self.ledger.count_runs()
        return web.json_response({"ledger": self.ledger.url, **views.summary_json(counts)})

    async def _metrics(self, request: web.Request) -> web.Response:
        counts = await self.ledger.count_runs()
        try:
            body, content_type = views.metrics_text(counts)
        except ImportError as exc:
            return web.Response(status=501, text=str(exc) + "\n")
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: ``runs`` (rows of the page's window that changed, all of
        them at first), ``gone`` (ids of runs that left the window) and ``run`` (the
        watched run's detail when it changed)."""
        params = dict(request.query)
        watch = params.pop("watch", None) or None
        params.pop("cursor", None)  # live updates follow the newest page only
        try:
            query = views.parse_query(params)
        except views.QueryError as exc:
            return _refuse(400, str(exc))
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "X-Accel-Buffering": "no", **_HEADERS})
        await response.prepare(request)
        shown: dict[str, tuple[Any, ...]] = {}
        watched: tuple[Any, ...] | None = None
        quiet_since = time.monotonic()
        with contextlib.suppress(ConnectionError):
            while not self.closing.is_set():
                sent = False
                page, _ = await self.page_of(query)
                notes = await self.cancel_notes(page)
                rows = [views.run_json(r, note) for r, note in zip(page, notes, strict=True)]
                changed = [row for row in rows if shown.get(row["run_id"]) != _mark(row)]
                if changed:
                    shown.update((row["run_id"], _mark(row)) for row in changed)
                    await _send(response, "runs", changed)
                    sent = True
                # Runs that left the window (no longer match a state filter, or pushed
                # out by newer ones): the page drops them, as a reload would.
                gone = sorted(set(shown) - {row["run_id"] for row in rows})
                if gone:
                    for run_id in gone:
                        del shown[run_id]
                    await _send(response, "gone", gone)
                    sent = True
                if watch is not None:
                    record = await self.ledger.get(watch)
                    if record is not None:
                        (note,) = await self.cancel_notes([record])
                        row = views.run_json(record, note)
                        if _mark(row) != watched:
                            watched = _mark(row)
                            await _send(response, "run", await self.detail(record))
                            sent = True
                if sent:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > _KEEPALIVE_SECONDS:
                    await response.write(b": keep-alive\n\n")  # finds a closed client
                    quiet_since = time.monotonic()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), self.settings.poll_seconds)
        return response


def _mark(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["state"], row["updated_at"], row["attempt"], row["has_outcome"],
            row["cancel_note"])


async def _send(response: web.StreamResponse, event: str, data: Any) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())


class UIServer:
    """A running runs page. ``url`` is where it answers; ``aclose`` (or ``close`` for
    one started by ``serve``) stops it, ending open live-update streams first."""

    def __init__(self, page: RunsPage, runner: web.AppRunner, url: str,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.page = page
        self.url = url
        self._runner = runner
        self._loop = loop
        self._closed = False

    @property
    def ledger_url(self) -> str:
        return self.page.ledger.url

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.page.closing.set()
        try:
            await self._runner.cleanup()
        finally:
            await self.page.aclose_adapters()

    def close(self) -> None:
        """Stop a server started by ``serve`` (on the shared loop) from a plain thread."""
        if self._loop is shared_loop.get_loop():
            shared_loop.run_sync(self.aclose())
        else:
            asyncio.run_coroutine_threadsafe(self.aclose(), self._loop).result()


async def start(
    *,
    ledger: str | None = None,
    listen: str = DEFAULT_LISTEN,
    token: str | None = None,
    config: Any = None,
    hub: Any = None,
    poll_seconds: float = 1.0,
) -> UIServer:
    """Start the runs page on the running loop and return once it listens.

    ``hub``: its configuration gives the ledger (unless ``ledger`` is given) and the keys
    outcomes are verified with; runs in flight in this process can be cancelled.
    ``config``: a loaded ``Config`` for the same purpose without a Hub. Either way, the
    jobs of runs submitted elsewhere in its backend environments can be cancelled when
    no other unfinished run shares them."""
    settings = check_settings(listen, token, poll_seconds)
    if hub is not None and config is None:
        config = hub.config
    url = ledger or (config.ledger if config is not None else None)
    reach = await asyncio.to_thread(reach_of, config)
    page = RunsPage(open_ledger(url), settings, config, reach)
    runner = web.AppRunner(page.app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UIConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return UIServer(page, runner, f"http://{shown}:{port}/", asyncio.get_running_loop())


def reach_of(config: Any) -> dict[str, tuple[str, str | None]]:
    """Each configured environment's executor, and None when the page can cancel its jobs
    itself (a backend adapter), else why not. Imports adapter modules: run in a thread."""
    if config is None:
        return {}
    reach: dict[str, tuple[str, str | None]] = {}
    for name in config.environments:
        try:
            reach[name] = remote_cancel_reason(config.environment_settings(name))
        except Exception as exc:  # one broken environment leaves the others reachable
            reach[name] = ("?", f"its settings cannot be read here: {exc}")
    return reach


def serve(hub: Any = None, **options: Any) -> UIServer:
    """Start the runs page on the shared loop, beside ``hub``'s dispatchers, from
    synchronous code; ``close()`` the result to stop it (it also stops at exit).
    Options: those of ``start``."""
    # What blocks (the first import of parse_listen's module, reading the page's files)
    # happens here, in the caller's thread, never on the shared loop.
    check_settings(options.get("listen", DEFAULT_LISTEN), options.get("token"),
                   options.get("poll_seconds", 1.0))
    static_files()
    server = shared_loop.run_sync(start(hub=hub, **options))
    shared_loop.add_shutdown_hook(server.aclose, shared_loop.PHASE_CALLERS)
    return server
