"""Celery under faults: real ``celery worker`` processes and a private redis-server as
broker and result backend, both started here and killed by their own PIDs.

Scenarios (issue 11), each counted with the suite's ``Counts`` within a bound:
  (a) kill -9 of a prefork child mid-task, ``requeue`` + heartbeats;
  (b) kill -9 of the whole worker (its process group) with runs running, prefetched
      (unacked, visibility timeout 1 h) and queued, then a new worker: every run resolves
      once, with its own value;
  (c) the broker killed for ~4 s mid-burst (runs queued, prefetched, running, and more
      submitted while it is down) and restarted empty: every run resolves;
  (d) 100 ``require_ack`` cancels of running tasks: each acknowledged or raising
      ``CancelNotAcknowledgedError``, and none left running (checked on the task side:
      every execution has its end mark, no worker reports an active task).

Executions above one per run are allowed only for runs whose execution a kill cut short
(``requeue`` is at least once); the prefetched messages a dead worker held were never
started, so their runs must execute exactly once.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fault_tasks
import faults
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "celery"))

from celery_services import CeleryService

from wove_adapters.core.errors import CancelNotAcknowledgedError

FAULTS_DIR = str(Path(__file__).resolve().parent)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., CeleryService]]:
    """``start_worker(redis_url, concurrency)``: a real prefork worker on the private
    broker, on a queue and key prefix of its own, stopped by PID at the end."""
    started: list[CeleryService] = []

    def start(redis_url: str, concurrency: int = 2) -> CeleryService:
        service = CeleryService("redis", concurrency=concurrency, redis_url=redis_url,
                                log_dir=tmp_path, pythonpath=(FAULTS_DIR,))
        started.append(service)
        service.start(timeout=90)
        return service

    yield start
    for service in started:
        service.stop()


Rig = tuple[faults.RedisServer, CeleryService, Any]


@pytest.fixture
def rig(
    private_redis: Callable[..., faults.RedisServer],
    start_worker: Callable[..., CeleryService],
    hub_for: Callable[..., Any], sqlite_ledger: str,
) -> Callable[..., Rig]:
    """``rig(concurrency=2, ledger=None, **settings)``: what every scenario here starts
    from, as ``(broker, service, hub)``: a private Redis (broker and result backend), a
    prefork worker of ``concurrency`` processes on it, and a Hub (``ledger``, default a
    sqlite file) whose environment is ``environment(service, **settings)``."""

    def make(concurrency: int = 2, ledger: str | None = None, **settings: Any) -> Rig:
        broker = private_redis()
        service = start_worker(broker.url(), concurrency=concurrency)
        return broker, service, hub_for(environment(service, **settings),
                                        ledger=ledger or sqlite_ledger)

    return make


def environment(service: CeleryService, **settings: Any) -> dict[str, Any]:
    """``settings`` are the environment's; an ``executor_config`` among them is merged."""
    return {
        "executor": "celery",
        **settings,
        # Reconcile every second: the scenarios' bounds stay short.
        "executor_config": {**service.executor_config, "reconcile_seconds": 1.0,
                            **settings.get("executor_config", {})},
        "delivery_orphan_policy": settings.get("delivery_orphan_policy", "requeue"),
    }


def unacked(url: str, service: CeleryService) -> int:
    """Messages the broker holds for a worker (prefetched, not yet acknowledged)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        return int(client.hlen(f"{service.prefix}unacked"))
    finally:
        client.close()


def started_tags(markers: Path) -> set[str]:
    return {mark.tag for mark in faults.read_marks(markers) if mark.event == "start"}


def settle(name: str, futures: dict[str, Any], markers: Path, bound: float,
           began: float) -> faults.Counts:
    counts = faults.Counts(name)
    expected = {tag: fault_tasks.expected(tag) for tag in futures}
    faults.count_futures(counts, futures, expected, timeout=bound)
    faults.count_executions(counts, markers, futures,
                            allowed=faults.allowed_after_kills(markers))
    counts.seconds = time.monotonic() - began
    return counts


# ---------------------------------------------------------------- (a) a child killed


def test_a_child_killed_mid_task_is_requeued(
    rig: Callable[..., Rig], markers: Path,
) -> None:
    _, service, hub = rig(delivery_heartbeat_seconds=3)
    began = time.monotonic()
    tags = [f"a{i}" for i in range(24)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, 0.4) for tag in tags}
    assert service.process is not None
    killed: list[str] = []
    while len(killed) < 3:
        # An execution that started and has not ended runs in a prefork child now.
        children = set(faults.children(service.process.pid))
        running = {tag: pid for tag, pid in faults.running(markers).items()
                   if pid in children and tag not in killed}
        if running:
            tag, pid = next(iter(running.items()))
            faults.kill(pid, signal.SIGKILL)
            killed.append(tag)
        assert time.monotonic() - began < 60, f"only {len(killed)} kills in 60 s"
        time.sleep(0.05)
    counts = settle("celery (a) child kill -9 x3, requeue", futures, markers, 90, began)
    faults.check(counts)


# ---------------------------------------------------------------- (b) the whole worker


def test_b_whole_worker_killed_then_restarted(
    rig: Callable[..., Rig], markers: Path,
) -> None:
    """Killed with messages running, prefetched (unacked until the 1 h visibility
    timeout: no new worker takes them) and queued. Reconciliation must find the ones no
    live worker holds and requeue them; the new worker runs the rest."""
    broker, service, hub = rig(delivery_heartbeat_seconds=3)
    began = time.monotonic()
    tags = [f"b{i}" for i in range(120)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, 0.1) for tag in tags}
    faults.wait_until(lambda: len(started_tags(markers)) >= 10, 60, "ten executions")
    service.kill()
    held = unacked(broker.url(), service)
    service.start(timeout=90)  # same node name, queue and key prefix
    counts = settle("celery (b) whole worker kill -9 + restart", futures, markers, 100, began)
    print(f"\n  prefetched (unacked) at the kill: {held}; dispatcher: "
          f"{ {k: v for k, v in hub.dispatcher().stats.items() if v} }")
    assert held > 0, "the kill left no prefetched message: the scenario did not happen"
    faults.check(counts)


# ---------------------------------------------------------------- (c) the broker


def test_c_broker_killed_mid_burst_and_restarted(
    rig: Callable[..., Rig], markers: Path,
) -> None:
    """The broker (also the result backend) dies with messages queued, prefetched and
    running; 20 more runs are submitted while it is down; it comes back empty ~4 s
    later. With requeue every run resolves, each with its own value."""
    broker, _, hub = rig(delivery_heartbeat_seconds=3)
    began = time.monotonic()
    futures = {f"c{i}": hub.submit(fault_tasks.work, str(markers), f"c{i}", 0.1)
               for i in range(100)}
    faults.wait_until(lambda: len(started_tags(markers)) >= 10, 60, "ten executions")
    broker.kill()
    down = time.monotonic()
    futures.update({f"c{i}": hub.submit(fault_tasks.work, str(markers), f"c{i}", 0.1)
                    for i in range(100, 120)})
    time.sleep(max(0.0, 4.0 - (time.monotonic() - down)))
    broker.start()  # same port, no persistence: empty
    counts = settle("celery (c) broker kill -9 ~4 s mid-burst", futures, markers, 100, began)
    print(f"\n  dispatcher: { {k: v for k, v in hub.dispatcher().stats.items() if v} }")
    faults.check(counts)


# ---------------------------------------------------------------- (d) cancels


def test_d_require_ack_cancels_of_running_tasks(
    rig: Callable[..., Rig], markers: Path,
) -> None:
    """100 running tasks cancelled with require_ack, ``width`` at a time (all of them
    running when cancelled): each cancel is acknowledged or raises; afterwards no
    execution is open and the worker reports nothing active."""
    width, rounds = 5, 20
    _, service, hub = rig(width, delivery_cancel_mode="require_ack",
                          delivery_orphan_policy="fail")
    counts = faults.Counts("celery (d) 100 require_ack cancels of running tasks")
    refused = 0
    began = time.monotonic()
    for r in range(rounds):
        tags = [f"d{r}-{i}" for i in range(width)]
        futures = [hub.submit(fault_tasks.work, str(markers), tag, 30.0) for tag in tags]
        faults.wait_until(lambda tags=tags: set(tags) <= started_tags(markers), 60,
                          f"round {r}: all {width} tasks running")
        for tag, future in zip(tags, futures, strict=True):
            counts.runs += 1
            try:
                hub.cancel(future, mode="require_ack")
            except CancelNotAcknowledgedError:
                refused += 1  # an honest answer; the task side is checked below
            except Exception as exc:
                counts.problem("lost", f"{tag}: cancel raised {type(exc).__name__}: {exc}")
                continue
            if not future.done():
                counts.problem("hung", f"{tag}: the future is still pending after its cancel")
            else:
                counts.ok += 1
    time.sleep(1.0)
    counts.executions = len(started_tags(markers))
    for tag, pid in faults.running(markers).items():
        counts.problem("over_executed", f"{tag} still running in pid {pid} after its cancel")
    app = service.client_app()
    try:
        active = app.control.inspect(destination=[service.node], timeout=2.0).active() or {}
    finally:
        app.close()
    for items in active.values():
        for item in items:
            counts.problem("over_executed", f"task {item.get('id')} still active at the worker")
    print(f"\n  acknowledged {counts.ok - refused}, CancelNotAcknowledgedError {refused}")
    faults.check(counts, began)


# ---------------------------------------------------------------- (e) after the slot is free


class _Blackhole:
    """A TCP relay in front of the caller's receiver (``callback_url`` names it) that
    can swallow what workers send: while ``swallow`` is set, requests are read and
    dropped, never answered, and never reach the caller, so a worker's outcome can
    only come back through what the worker recorded before its slot was freed."""

    def __init__(self, upstream: int) -> None:
        import socket
        import threading

        self.upstream = upstream
        self.swallow = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.swallowed = 0  # bytes dropped
        threading.Thread(target=self._accept, daemon=True, name="blackhole").start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: Any, target: Any, to_caller: bool) -> None:
        with source, target:
            while True:
                try:
                    data = source.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                if to_caller and self.swallow.is_set():
                    self.swallowed += len(data)
                    continue
                try:
                    target.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("ledger", ["sqlite", "memory"])
def test_e_worker_killed_after_finishing_before_the_ack(
    rig: Callable[..., Rig], markers: Path, ledger: str,
) -> None:
    """Every task finishes while its caller's receiver takes nothing (a relay swallows
    the workers' requests), so no outcome is acknowledged; the whole worker is killed
    -9 as soon as the backend shows every job finished (its slot freed), with every
    outcome still undelivered in its outbox. ``fail``: a run the worker left nowhere
    would raise DeliveryOrphanedError. Each run must resolve once, with its own value,
    from what the worker recorded before it freed the slot (the sqlite ledger; with a
    memory ledger, which workers cannot reach, the job's ``SUCCESS`` record), and run
    once."""
    port = faults.free_port()
    relay = _Blackhole(port)
    try:
        _, service, hub = rig(
            ledger="memory://" if ledger == "memory" else None,
            delivery_orphan_policy="fail", executor_config={
                "callback_port": port, "callback_url": f"http://127.0.0.1:{relay.port}"})
        assert hub.run(fault_tasks.work, str(markers), "e-warm") == "done:e-warm"
        relay.swallow.set()
        began = time.monotonic()
        tags = [f"e{i}" for i in range(8)]
        futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, 0.1) for tag in tags}
        dispatcher = hub.dispatcher("faults")
        app = service.client_app()
        try:
            def finished() -> bool:
                runs = [dispatcher.runs.get(future.run_id) for future in futures.values()]
                handles = [run.attempt.submission for run in runs if run is not None]
                return len(handles) == len(tags) and all(
                    handle and app.AsyncResult(handle).state == "SUCCESS" for handle in handles)

            faults.wait_until(finished, 60, "every job finished at the backend", interval=0.005)
        finally:
            app.close()
        service.kill()
        swallowed = relay.swallowed
        relay.swallow.clear()
        assert not any(future.done() for future in futures.values()), (
            "a result reached the caller before the kill: nothing was tested")
        counts = settle(f"celery (e) worker kill -9 after finishing, before the ack, "
                        f"{ledger} ledger", futures, markers, 90, began)
        print(f"\n  bytes swallowed: {swallowed}; dispatcher: "
              f"{ {k: v for k, v in hub.dispatcher().stats.items() if v} }")
        assert swallowed, "the relay swallowed nothing: the outcomes were not held back"
        faults.check(counts)
    finally:
        relay.close()
