"""Shared by the runs page's tests (tests/ui): a task that runs until the test lets it
end, and waits on the ledger. Registered to be pickled by value, so stdio and process
workers run ``hold`` without importing this module."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import cloudpickle

from wove_adapters.core.ledger import open_ledger

cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT = 60.0


def hold(marker: str, most: float = 120.0) -> str:
    """Runs until ``marker`` exists (the test decides when it ends), ``most`` at most."""
    deadline = time.monotonic() + most
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return marker


def state_of(url: str, run_id: str) -> str | None:
    """The run's state in the ledger at ``url`` (None: no record yet)."""
    record = asyncio.run(open_ledger(url).get(run_id))
    return None if record is None else record.state


def until(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """``check()``'s first truthy answer; an exception counts as not yet (a page element
    replaced while it was read)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = check()
        except Exception:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


class Client:
    """Plain HTTP against the server (http.client: no redirects followed, no cookies
    kept, every header exactly as given)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 80
        self.origin = f"http://{self.host}:{self.port}"

    def request(self, method: str, path: str, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def json(self, path: str, **params: Any) -> Any:
        query = f"?{urlencode(params)}" if params else ""
        status, _, body = self.request("GET", path + query)
        assert status == 200, body
        return json.loads(body)


def metric_values(text: str) -> dict[tuple[str, str, str], float]:
    """``wove_ledger_runs`` samples of a /metrics answer, by (environment, executor,
    state)."""
    values: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("wove_ledger_runs{"):
            labels, _, value = line.partition("} ")
            pairs = dict(part.split("=", 1) for part in labels[len("wove_ledger_runs{"):]
                         .split(","))
            key = (pairs["environment"].strip('"'), pairs["executor"].strip('"'),
                   pairs["state"].strip('"'))
            values[key] = float(value)
    return values
