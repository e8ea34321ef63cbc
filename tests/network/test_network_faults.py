"""Faults between our network clients and `wove-adapters serve`: a service killed mid-run,
a service restarted, a connection cut by the network, a service that freezes. Each one is
a lost run: the client reports ``task_lost`` and the dispatcher's orphan policy applies,
within a bound; the counts (lost, requeued, executions, results) are asserted."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core.errors import BackendUnavailableError, DeliveryOrphanedError
from wove_adapters.integration.hub import Hub
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_conformance_network import Served, running

TRANSPORTS = ("http", "grpc", "websocket")
BOUND = 15.0  # seconds a lost run may take to reach its caller


def slow_record(directory: str, tag: str, seconds: float) -> str:
    """One line per execution in ``<tag>.runs``; ``<tag>.started`` once running."""
    with open(Path(directory, f"{tag}.runs"), "a") as handle:
        handle.write(f"{os.getpid()}\n")
    Path(directory, f"{tag}.started").write_text(str(os.getpid()))
    time.sleep(seconds)
    return f"{tag}-done"


def die_once(directory: str, tag: str) -> str:
    """The first execution waits (to be killed with its service); later ones finish."""
    with open(Path(directory, f"{tag}.runs"), "a") as handle:
        handle.write(f"{os.getpid()}\n")
    marker = Path(directory, f"{tag}.started")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(60)
    return f"{tag}-done"


def runs(markers: Path, tag: str) -> int:
    path = markers / f"{tag}.runs"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    transport, options = request.param if isinstance(request.param, tuple) \
        else (request.param, {})
    yield from running(transport, tmp_path, max_tasks=4, **options)


def hub_on(served: Served, config: dict[str, Any] | None = None, **settings: Any) -> Hub:
    name = f"faults-{uuid.uuid4().hex[:8]}"
    definition = {"executor": served.transport,
                  "executor_config": {**served.executor_config(), **(config or {})},
                  **settings}
    return Hub(environments={name: definition}, default_environment=name)


def stats(hub: Hub) -> dict[str, int]:
    return hub.dispatcher().stats


def wait_heard(hub: Hub, bound: float) -> None:
    """Until the caller has an event of its one run (its task_started)."""
    deadline = time.monotonic() + bound
    while not any(run.heard or run.started for run in list(hub.dispatcher().runs.values())):
        assert time.monotonic() < deadline, f"no event of the run within {bound}s"
        time.sleep(0.02)


@pytest.mark.parametrize("service", TRANSPORTS, indirect=True)
def test_service_killed_mid_run_fails_each_run_within_a_bound(
    service: Served, markers: Path
) -> None:
    with hub_on(service, delivery_orphan_policy="fail") as hub:
        futures = [hub.submit(slow_record, str(markers), f"k{i}", 60.0) for i in range(3)]
        for i in range(3):
            wait_for_file(markers / f"k{i}.started", BOUND)
        killed = time.monotonic()
        service.kill()
        for future in futures:
            with pytest.raises(DeliveryOrphanedError, match="lost"):
                future.result(timeout=BOUND)
        assert time.monotonic() - killed < BOUND
        assert stats(hub)["lost"] == 3 and stats(hub)["requeued"] == 0
        # Nothing listens now: a new run fails at once, naming the address.
        with pytest.raises(BackendUnavailableError, match=str(service.port)):
            hub.run(slow_record, str(markers), "after", 0.0)
    assert [runs(markers, f"k{i}") for i in range(3)] == [1, 1, 1]


@pytest.mark.parametrize("service", TRANSPORTS, indirect=True)
def test_service_restart_requeues_each_lost_run_once(service: Served, markers: Path) -> None:
    with hub_on(service, delivery_orphan_policy="requeue") as hub:
        futures = [hub.submit(die_once, str(markers), f"r{i}") for i in range(2)]
        for i in range(2):
            wait_for_file(markers / f"r{i}.started", BOUND)
        service.kill()
        service.start()
        assert [f.result(timeout=BOUND * 2) for f in futures] == ["r0-done", "r1-done"]
        assert stats(hub)["lost"] == 2 and stats(hub)["requeued"] == 2
    assert [runs(markers, f"r{i}") for i in range(2)] == [2, 2]


class Proxy:
    """A TCP relay on its own loop and thread, whose connections can be cut at once (a
    network failure between caller and service; both ends stay up)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.writers: set[asyncio.StreamWriter] = set()
        self.cuts = 0
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(sock), self.loop).result(10)

    async def _serve(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._relay, sock=sock)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.update((writer, up_writer))

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(1 << 16):
                    sink.write(data)
                    await sink.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update((writer, up_writer))

    def cut(self) -> None:
        def abort() -> None:
            self.cuts += 1
            for writer in list(self.writers):
                writer.transport.abort()

        self.loop.call_soon_threadsafe(abort)

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for writer in list(self.writers):
                writer.transport.abort()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.mark.parametrize("service", TRANSPORTS, indirect=True)
def test_cut_connection_with_a_key_runs_once(service: Served, markers: Path) -> None:
    """The connection is cut while the run goes on at the service: the client reports the
    run lost, ``requeue`` sends it again with its idempotency key, and the service
    attaches the new request to the run still in flight: one execution, one result."""
    proxy = Proxy(service.port)
    address = service.executor_config()
    key = "target" if service.transport == "grpc" else "url"
    address[key] = address[key].replace(str(service.port), str(proxy.port))
    try:
        with hub_on(service, address, delivery_orphan_policy="requeue",
                    delivery_idempotency_key=f"cut-{uuid.uuid4().hex}") as hub:
            future = hub.submit(slow_record, str(markers), "cut", 3.0)
            wait_for_file(markers / "cut.started", BOUND)
            # A cut before the client has any event of the run is a failed hand-over,
            # which it sends again once on a fresh connection: one result too, but no
            # loss to count. This test is about a cut mid-run, so it waits for that.
            wait_heard(hub, BOUND)
            proxy.cut()
            assert future.result(timeout=BOUND) == "cut-done"
            assert stats(hub)["lost"] == 1 and stats(hub)["requeued"] == 1
        assert proxy.cuts == 1
        assert runs(markers, "cut") == 1, "the requeued request ran the task again"
    finally:
        proxy.close()


@pytest.mark.parametrize("service", ["http", "websocket"], indirect=True)
def test_frozen_service_is_a_heartbeat_lapse(service: Served, markers: Path) -> None:
    """A service that stops answering (SIGSTOP: its connections stay open) sends no
    heartbeats: the run is lost after delivery_heartbeat_seconds and, under ``cancel``,
    the caller sees a cancellation within a bound although the cancel request itself
    cannot get through (bounded by executor_config.timeout)."""
    assert service.proc is not None
    with hub_on(service, {"timeout": 2.0} if service.transport == "http" else {},
                delivery_orphan_policy="cancel", delivery_heartbeat_seconds=1.0) as hub:
        future = hub.submit(slow_record, str(markers), "frozen", 30.0)
        wait_for_file(markers / "frozen.started", BOUND)
        os.kill(service.proc.pid, signal.SIGSTOP)
        try:
            frozen = time.monotonic()
            with pytest.raises(CancelledErrors):
                future.result(timeout=BOUND)
            assert time.monotonic() - frozen < BOUND
            assert stats(hub)["lost"] == 1
        finally:
            os.kill(service.proc.pid, signal.SIGCONT)
