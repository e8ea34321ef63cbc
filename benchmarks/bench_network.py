"""Network executors: our client (``Hub`` with ``http``/``grpc``/``websocket``) and wove
2.0.3's own client of the same name against one ``wove-adapters serve`` per transport,
next to a bare aiohttp JSON round trip on the same machine (the floor), interleaved in one
run per transport, so every ratio comes from one run.

- **native** (the floor): an aiohttp server in its own process answering ``POST /`` with
  ``{"result": x + 1}`` for ``{"x": x}``, called by an aiohttp client session (one request
  per task, bursts gathered). No pickling, no signing, no task process: what any network
  round trip on this machine costs at least.
- **ours**: ``Hub.run(add, x)`` / ``Hub.map`` through our client: signed request, signed
  streamed answer verified before unpickling, the task run in serve's warm process pool.
- **wove**: wove's own executor (``HttpEnvironmentExecutor``, ``GrpcEnvironmentExecutor``,
  ``WebSocketEnvironmentExecutor``) against the same service, warm (``WoveRuntime``).

Prints one JSON line per transport: ``{"backend": "network-<transport>", "native",
"ours", "wove", "ratio_ours_native", "ratio_ours_wove", ...}``.

    python benchmarks/bench_network.py [--transport http --transport grpc ...]
        [--seq 200] [--burst 1000] [--rounds 3] [--max-tasks 2] [--no-wove]
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Side, emit, hub_side, log, record_of, settings_of, three_way

SECRET_ENV = "WOVE_BENCH_NETWORK_SECRET"
TRANSPORTS = ("http", "grpc", "websocket")

FLOOR_SERVER = """
import sys
from aiohttp import web

async def add(request):
    data = await request.json()
    return web.json_response({"result": data["x"] + 1})

app = web.Application()
app.router.add_post("/", add)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers (405 for GET on the floor)
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@contextmanager
def process(command: list[str], ready_url: str) -> Iterator[None]:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_http(ready_url, proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def served(transport: str, max_tasks: int) -> Iterator[str]:
    """``wove-adapters serve`` for ``transport`` (signed); yields its address."""
    port = free_port()
    health = free_port() if transport == "grpc" else port
    command = [sys.executable, "-m", "wove_adapters.cli", "serve", "--transport", transport,
               "--listen", f"127.0.0.1:{port}", "--security", f"env:{SECRET_ENV}",
               "--max-tasks", str(max_tasks)]
    if transport == "grpc":
        command += ["--health-listen", f"127.0.0.1:{health}"]
    with process(command, f"http://127.0.0.1:{health}/healthz"):
        yield {"http": f"http://127.0.0.1:{port}/", "grpc": f"127.0.0.1:{port}",
               "websocket": f"ws://127.0.0.1:{port}/"}[transport]


class Floor:
    """The bare aiohttp JSON round trip, driven from a loop thread of its own."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def open_session() -> Any:
            return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

        self.session = self._call(open_session())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(600)

    async def _one(self, x: int) -> int:
        async with self.session.post(self.url, json={"x": x}) as response:
            return int((await response.json())["result"])

    def one(self, x: int) -> int:
        return int(self._call(self._one(x)))

    def burst(self, n: int) -> list[int]:
        async def all_of() -> list[int]:
            return list(await asyncio.gather(*(self._one(i) for i in range(n))))

        return list(self._call(all_of()))

    def side(self) -> Side:
        return Side("native", self.one, self.burst)

    def close(self) -> None:
        self._call(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def measure(transport: str, floor_url: str, args: Any) -> dict[str, Any]:
    from wove_adapters.integration.hub import Hub

    with served(transport, args.max_tasks) as address:
        config = {"security": f"env:{SECRET_ENV}",
                  ("target" if transport == "grpc" else "url"): address}
        hub = Hub(environments={"net": {"executor": transport, "executor_config": config}},
                  default_environment="net")
        floor = Floor(floor_url)
        try:
            measured, notes = three_way([floor.side(), hub_side(hub)], args,
                                        f"network-{transport}", transport, dict(config),
                                        with_wove=not args.no_wove)
        finally:
            hub.close()
            floor.close()
    return record_of(
        f"network-{transport}", measured, wove_note=notes["wove_note"],
        native_description="bare aiohttp JSON POST round trip to an aiohttp server "
                           "(no pickling, signing or task process): the floor",
        ours_description=f"Hub, executor {transport!r}, against wove-adapters serve "
                         f"(signed, --max-tasks {args.max_tasks})",
        wove_description=f"wove 2.0.3's {transport} executor against the same service",
        settings=settings_of(args, max_tasks=args.max_tasks),
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=200, help="sequential round trips per side")
    parser.add_argument("--burst", type=int, default=1000, help="tasks submitted at once")
    parser.add_argument("--rounds", type=int, default=3, help="burst rounds per side")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--transport", action="append", choices=TRANSPORTS)
    parser.add_argument("--max-tasks", type=int, default=2)
    parser.add_argument("--no-wove", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-net-"))
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(16))
    port = free_port()
    floor_url = f"http://127.0.0.1:{port}/"
    with process([sys.executable, "-c", FLOOR_SERVER, str(port)], floor_url):
        for transport in args.transport or TRANSPORTS:
            log(f"[network-{transport}]")
            emit(measure(transport, floor_url, args))


if __name__ == "__main__":
    main()
