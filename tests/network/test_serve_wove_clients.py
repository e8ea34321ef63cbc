"""wove 2.x's own network executors, unmodified, against ``wove-adapters serve``.

Driven the way wove's runtime drives them (start / send run_task and cancel_task / recv /
stop), on every transport, signed and bearer, and inside real ``wove.weave()`` blocks
configured with ``wove.config(environments=...)``: a result, a task error re-raised with
its own type, an async task, and a cancel that really stops the task's process.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

wove = pytest.importorskip("wove", reason="the wove extra is part of the network env")

from services import pid_alive, wait_until  # noqa: E402
from wove.environment import (  # noqa: E402
    GrpcEnvironmentExecutor,
    HttpEnvironmentExecutor,
    WebSocketEnvironmentExecutor,
)

TERMINAL = {"task_result", "task_error", "task_cancelled"}


class LedgerMismatch(Exception):
    """A task's own exception type: it must come back as itself."""


def double(x: int) -> tuple[int, int]:
    return x * 2, os.getpid()


def broken(account: str) -> None:
    raise LedgerMismatch(f"account {account} does not balance")


async def async_add(a: int, b: int) -> int:
    await asyncio.sleep(0.05)
    return a + b


def slow(directory: str, seconds: float = 30.0) -> str:
    """Says its pid, then sleeps; writes ``done`` only if nobody stopped it."""
    import os
    import time
    from pathlib import Path

    # Written whole, then renamed: a reader polling for the file never sees it empty.
    Path(directory, "pid.tmp").write_text(str(os.getpid()))
    Path(directory, "pid.tmp").replace(Path(directory, "pid"))
    time.sleep(seconds)
    Path(directory, "done").write_text("not cancelled")
    return "finished"


def make_executor(transport: str) -> Any:
    return {
        "http": HttpEnvironmentExecutor,
        "https": lambda: HttpEnvironmentExecutor(require_https=True),
        "grpc": GrpcEnvironmentExecutor,
        "websocket": WebSocketEnvironmentExecutor,
    }[transport]()


def run_frame(run_id: str, func: Callable[..., Any], **args: Any) -> dict[str, Any]:
    return {"type": "run_task", "run_id": run_id, "task_id": func.__name__, "callable": func,
            "args": args, "delivery": {}}


async def drive(transport: str, config: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """The result, error, async and cancel runs through one wove executor."""
    executor = make_executor(transport)
    await executor.start(environment_name="remote", environment_config=config, run_config={})
    seen: dict[str, list[dict[str, Any]]] = {}
    try:
        for frame in (run_frame("r-double", double, x=21),
                      run_frame("r-broken", broken, account="4711"),
                      run_frame("r-async", async_add, a=2, b=3),
                      run_frame("r-slow", slow, directory=str(workdir))):
            await executor.send(frame)

        async def collect(until: Callable[[], bool], limit: float) -> None:
            """Take events until ``until()`` holds (it may also wait on a file: polled)."""
            deadline = time.monotonic() + limit
            while not until():
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; events so far: {seen}"
                try:
                    event = await asyncio.wait_for(executor.recv(), min(left, 0.1))
                except asyncio.TimeoutError:
                    continue
                seen.setdefault(event["run_id"], []).append(event)

        def ended(run_id: str) -> bool:
            return any(e["type"] in TERMINAL for e in seen.get(run_id, []))

        await collect(lambda: all(ended(r) for r in ("r-double", "r-broken", "r-async"))
                      and (workdir / "pid").exists(), 60)
        if transport == "websocket":  # the streaming transport: heartbeats while it runs
            await collect(lambda: any(e["type"] == "heartbeat" for e in seen.get("r-slow", [])),
                          10)
        pid = int((workdir / "pid").read_text())
        assert pid_alive(pid), "the slow task's process should be running before the cancel"
        await executor.send({"type": "cancel_task", "run_id": "r-slow", "task_id": "slow",
                             "delivery_cancel_mode": "require_ack",
                             "delivery_orphan_policy": "cancel"})
        # Its terminal event, and (unary transports: in the run's own answer, which may
        # come after the cancel's answer) its task_started.
        await collect(lambda: ended("r-slow") and any(
            e["type"] == "task_started" for e in seen.get("r-slow", [])), 30)
    finally:
        await executor.stop()
    return {"events": seen, "pid": pid}


@pytest.mark.parametrize(("transport", "security", "tls"), [
    ("http", "signed", False), ("http", "bearer", False),
    ("https", "signed", True), ("https", "bearer", True),
    ("grpc", "signed", False), ("grpc", "bearer", False), ("grpc", "signed", True),
    ("websocket", "signed", False), ("websocket", "bearer", False),
    ("websocket", "bearer", True),
])
def test_wove_executor_against_serve(serve: Callable[..., Any], tmp_path: Path,
                                     transport: str, security: str, tls: bool) -> None:
    served = serve(transport, security=security, tls=tls, heartbeat=0.2, kill_after=3)
    outcome = asyncio.run(drive(transport, served.executor_config(timeout=60), tmp_path))
    events = outcome["events"]

    def terminal(run_id: str) -> dict[str, Any]:
        found = [e for e in events[run_id] if e["type"] in TERMINAL]
        assert len(found) == 1 or {e["type"] for e in found} == {"task_cancelled"}, found
        return found[0]

    value, pid = terminal("r-double")["result"]
    assert value == 42 and pid != os.getpid() and pid != served.pid

    error = terminal("r-broken")
    assert error["type"] == "task_error"
    assert isinstance(error["exception"], LedgerMismatch)  # wove re-raises this object
    assert "account 4711 does not balance" in str(error["exception"])
    assert error["error"]["kind"] == "LedgerMismatch"
    assert "broken" in error["error"]["traceback"]

    assert terminal("r-async")["result"] == 5

    assert terminal("r-slow")["type"] == "task_cancelled"
    # The cancel reached the task's own process: it is gone, long before its sleep ends.
    wait_until(lambda: not pid_alive(outcome["pid"]), 10, "the cancelled task's process to end")
    assert not (tmp_path / "done").exists()
    assert any(e["type"] == "task_started" for e in events["r-slow"])
    health = served.health()
    assert health["ok"] and health["running"] == 0 and health["refusals"] == 0
    assert health["runs"]["succeeded"] == 2 and health["runs"]["failed"] == 1
    assert health["runs"]["cancelled"] == 1


# ---------------------------------------------------------------- inside wove.weave()


@pytest.fixture
def remote_environment(serve: Callable[..., Any], request: pytest.FixtureRequest) -> Any:
    """``wove.config`` with a ``remote`` environment on wove's own executor for the
    transport (by its plain name, as a wove_config.py would write it)."""
    transport, security = getattr(request, "param", ("http", "signed"))
    served = serve(transport, security=security, kill_after=3)
    wove.config(environments={"remote": {"executor": transport,
                                         "executor_config": served.executor_config()}})
    yield served
    wove.config(environments={"default": {"executor": "local"}}, default_environment="default")


@pytest.mark.parametrize("remote_environment", [("http", "signed"), ("http", "bearer"),
                                                ("websocket", "signed")], indirect=True)
def test_weave_result_and_error_through_serve(remote_environment: Any) -> None:
    with wove.weave() as w:

        @w.do(environment="remote")
        def answer() -> tuple[int, int]:
            return 6 * 7, os.getpid()

        @w.do
        def local_half(answer: tuple[int, int]) -> float:
            return answer[0] / 2

    value, pid = w.result.answer
    assert value == 42 and pid not in (os.getpid(), remote_environment.pid)
    assert w.result.local_half == 21

    with wove.weave() as w:

        @w.do(environment="remote")
        def reconcile() -> None:
            raise LedgerMismatch("ledger 9 is off by 3")

    with pytest.raises(LedgerMismatch, match="ledger 9 is off by 3"):
        w.result.reconcile  # noqa: B018 - wove raises a task's error on access
    assert remote_environment.health()["runs"]["failed"] == 1


# wove 2.0.3's HTTP and gRPC executors send a cancel_task from a task they create and then,
# when the weave ends, cancel every request task they hold: a cancel whose task has not
# started by then is never sent (measured: about one run in three under pytest). Its
# websocket executor awaits the send, so inside a weave the cancel is tested on it; the
# HTTP and gRPC executors' cancel is tested above, driven directly.
@pytest.mark.parametrize("remote_environment", [("websocket", "bearer")], indirect=True)
def test_weave_cancel_stops_the_task(remote_environment: Any, tmp_path: Path) -> None:
    """wove cancels on delivery_timeout (a cancel_task frame): the task's process ends."""
    directory = str(tmp_path)
    started = time.monotonic()
    with pytest.raises(wove.DeliveryTimeoutError):
        with wove.weave() as w:

            @w.do(environment="remote", delivery_timeout=1.5)
            def stuck() -> str:
                return slow(directory)

        w.result.stuck  # noqa: B018
    pid = int((tmp_path / "pid").read_text())
    wait_until(lambda: not pid_alive(pid), 10, "the cancelled task's process to end")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "done").exists()
    health = remote_environment.health()
    assert health["runs"]["cancel_requests"] >= 1 and health["runs"]["cancelled"] == 1
