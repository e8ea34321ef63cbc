"""``wove-adapters serve`` in operation: crashes, back-pressure, draining, idempotency,
and our signed streaming extension (NDJSON over HTTP, the gRPC stream)."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from services import pid_alive, port_open, wait_until
from shared_servers import require_module

from wove_adapters.core import netwire

GRPC_INSTALL = "pip install 'wove-adapters[grpc]' (tox -e network installs it)"
WS_INSTALL = "pip install websockets (tox -e network installs it)"


def frame(func: Callable[..., Any], run_id: str | None = None, *,
          delivery: dict[str, Any] | None = None, **args: Any) -> bytes:
    return netwire.dump_message({
        "type": "run_task", "run_id": run_id or f"{func.__name__}:{uuid.uuid4().hex}",
        "task_id": func.__name__, "callable": func, "args": args, "delivery": delivery or {}})


def call(served: Any, body: bytes, timeout: float = 60.0) -> tuple[int, list[dict[str, Any]]]:
    """One wove-style HTTP request: status and decoded events."""
    status, answer = served.post(body, served.auth_headers(body), timeout=timeout)
    if status != 200:
        return status, [{"error": answer.decode(errors="replace")}]
    return status, [netwire.decode_frame(e) for e in netwire.raw_events(json.loads(answer))]


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(target()), daemon=True)
    thread.start()
    return thread, box


def exits_hard(code: int) -> None:
    import os

    os._exit(code)


def segfaults() -> None:
    import ctypes

    ctypes.string_at(0)


def timed(directory: str, name: str, seconds: float) -> str:
    """Records when it ran, as ``start end`` in DIRECTORY/NAME."""
    import time
    from pathlib import Path

    start = time.time()
    time.sleep(seconds)
    Path(directory, name).write_text(f"{start} {time.time()}")
    return name


def sleeper(directory: str, seconds: float) -> int:
    import os
    import time
    from pathlib import Path

    Path(directory, f"pid-{os.getpid()}").write_text("")
    time.sleep(seconds)
    Path(directory, "done").write_text("")
    return os.getpid()


def counted(directory: str, seconds: float) -> str:
    """Appends a line per execution, so a test can count how often it really ran."""
    import time
    from pathlib import Path

    with open(Path(directory, "executions"), "a") as handle:
        handle.write("ran\n")
    time.sleep(seconds)
    return "the one result"


def test_a_crashing_task_leaves_the_service_up(serve: Callable[..., Any]) -> None:
    served = serve("http", max_tasks=2)
    for task, says in ((lambda: exits_hard(7), "exited with code 7"),
                       (segfaults, "SIGSEGV")):
        status, events = call(served, frame(task))
        assert status == 200
        error = events[-1]
        assert error["type"] == "task_error" and error["error"]["kind"] == "WorkerCrashed"
        assert says in error["error"]["message"] and error["error"]["source"] == "worker"
        assert served.process.running()
    status, events = call(served, frame(lambda: 41 + 1))
    assert events[-1]["type"] == "task_result" and events[-1]["result"] == 42
    health = served.health()
    assert health["ok"] and health["runs"]["crashed"] == 2


def test_max_tasks_back_pressure(serve: Callable[..., Any], tmp_path: Path) -> None:
    """N + 1 runs with --max-tasks N: at most N at once, the last waits, none lost; past
    --max-queued the service answers 503."""
    served = serve("http", max_tasks=2, max_queued=1)
    names = ["a", "b", "c"]
    threads = [in_thread(lambda n=n: call(served, frame(timed, directory=str(tmp_path),
                                                         name=n, seconds=1.0)))
               for n in names]
    wait_until(lambda: (lambda h: h["running"] == 2 and h["queued"] == 1)(served.health()),
               15, "two running and one queued")
    status, answer = call(served, frame(timed, directory=str(tmp_path), name="d", seconds=0))
    assert status == 503 and "busy" in answer[0]["error"]
    for thread, _ in threads:
        thread.join(30)
    results = sorted(box[0][1][-1]["result"] for _, box in threads)
    assert results == names  # none lost
    spans = [tuple(map(float, (tmp_path / n).read_text().split())) for n in names]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2  # two at once, never three
    assert not (tmp_path / "d").exists()
    assert served.health()["runs"]["busy"] == 1


def test_sigterm_drains_in_flight_runs(serve: Callable[..., Any], tmp_path: Path) -> None:
    served = serve("http", max_tasks=2, drain_timeout=20)
    threads = [in_thread(lambda n=n: call(served, frame(timed, directory=str(tmp_path),
                                                         name=n, seconds=1.5)))
               for n in ("x", "y")]
    wait_until(lambda: served.health()["running"] == 2, 15, "both runs running")
    served.process.popen.send_signal(15)
    wait_until(lambda: not port_open(served.port), 10, "serve to stop accepting")
    for thread, box in threads:
        thread.join(30)
        status, events = box[0]
        assert status == 200 and events[-1]["type"] == "task_result"  # delivered
    assert served.terminate(30) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name in "xy") == ["x", "y"]
    log = served.log_text()
    assert "draining" in log and "stopped" in log


def test_sigterm_cancel_mode(serve: Callable[..., Any], tmp_path: Path) -> None:
    served = serve("http", on_sigterm="cancel", kill_after=2)
    thread, box = in_thread(lambda: call(served, frame(sleeper, directory=str(tmp_path),
                                                       seconds=30)))
    pid_file = wait_until(lambda: next(tmp_path.glob("pid-*"), None), 15, "the task to start")
    started = time.monotonic()
    assert served.terminate(30) == 0
    thread.join(10)
    assert box and box[0][1][-1]["type"] == "task_cancelled"
    assert not pid_alive(int(pid_file.name.split("-")[1]))
    assert time.monotonic() - started < 10 and not (tmp_path / "done").exists()


def test_idempotency_key_runs_once(serve: Callable[..., Any], tmp_path: Path) -> None:
    served = serve("http", remember=60)
    delivery = {"delivery_idempotency_key": f"invoice-{uuid.uuid4().hex[:6]}"}
    first, second = (in_thread(lambda r=r: call(served, frame(
        counted, r, delivery=delivery, directory=str(tmp_path), seconds=1.0)))
        for r in ("first:1", "second:2"))
    for thread, _ in (first, second):
        thread.join(30)
    for (_, box), run_id in ((first, "first:1"), (second, "second:2")):
        status, events = box[0]
        assert status == 200 and events[-1]["result"] == "the one result"
        assert {e["run_id"] for e in events} == {run_id}  # its own run id, always
    status, events = call(served, frame(counted, "third:3", delivery=delivery,
                                        directory=str(tmp_path), seconds=1.0))
    assert events == [{"type": "task_result", "run_id": "third:3", "task_id": "counted",
                       "result": "the one result"}]
    assert (tmp_path / "executions").read_text() == "ran\n"  # one execution for three asks
    other = {"delivery_idempotency_key": "another-key"}
    call(served, frame(counted, delivery=other, directory=str(tmp_path), seconds=0))
    assert (tmp_path / "executions").read_text() == "ran\nran\n"


@pytest.mark.parametrize("security", ["signed", "bearer"])
def test_signed_ndjson_stream(serve: Callable[..., Any], tmp_path: Path, security: str) -> None:
    """Our extension: task_started, heartbeats and the result as they happen, each line
    signed for this request's nonce."""
    served = serve("http", security=security, heartbeat=0.2)
    body = frame(sleeper, directory=str(tmp_path), seconds=1.0)
    headers = served.auth_headers(body)
    nonce = headers.setdefault(netwire.HEADERS["nonce"], uuid.uuid4().hex)
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.port}/", data=body, method="POST",
        headers={**headers, "Accept": "application/x-ndjson",
                 netwire.SIGNED_ANSWER_HEADER: "1", "Content-Type": "application/json"})
    client = served.client_security()
    kinds, arrivals = [], []
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.headers["Content-Type"].startswith("application/x-ndjson")
        for line in answer:
            message = json.loads(line)
            text = message["body"].encode()
            client.verify_answer(message["sig"], "http", nonce, text)
            with pytest.raises(netwire.AuthError):  # bound to this request's nonce
                client.verify_answer(message["sig"], "http", "another-nonce", text)
            (event,) = [netwire.decode_frame(e) for e in netwire.raw_events(json.loads(text))]
            kinds.append(event["type"])
            arrivals.append(time.monotonic())
    assert kinds[0] == "task_started" and kinds[-1] == "task_result"
    assert kinds.count("heartbeat") >= 2
    assert arrivals[-1] - arrivals[0] > 0.8  # streamed as they happened, not at the end


def test_signed_grpc_stream(serve: Callable[..., Any], tmp_path: Path) -> None:
    grpc = require_module("grpc", "grpcio", GRPC_INSTALL)
    served = serve("grpc", security="signed", heartbeat=0.2)
    body = frame(sleeper, directory=str(tmp_path), seconds=0.8)
    headers = served.auth_headers(body, transport="grpc", target=netwire.GRPC_STREAM_METHOD)
    nonce = headers[netwire.HEADERS["nonce"]]
    metadata = (*((k.lower(), v) for k, v in headers.items()),
                (netwire.SIGNED_ANSWER_HEADER.lower(), "1"))
    client = served.client_security()
    kinds = []
    with grpc.insecure_channel(served.target) as channel:
        stream = channel.unary_stream(netwire.GRPC_STREAM_METHOD)
        for message in stream(body, metadata=metadata, timeout=30):
            wrapper = json.loads(message)
            text = wrapper["body"].encode()
            client.verify_answer(wrapper["sig"], "grpc", nonce, text)
            kinds += [e["type"] for e in netwire.raw_events(json.loads(text))]
    assert kinds[0] == "task_started" and kinds[-1] == "task_result"
    assert "heartbeat" in kinds


def test_a_websocket_that_goes_away_cancels_its_runs(serve: Callable[..., Any],
                                                     tmp_path: Path) -> None:
    """Nobody waits for the run any more (no idempotency key): its process is stopped."""
    require_module("websockets", "wove's websocket client library", WS_INSTALL)
    from websockets.sync.client import connect

    served = serve("websocket", security="bearer", kill_after=2)
    with connect(served.url, additional_headers=served.auth_headers(b"", transport="websocket"),
                 open_timeout=10) as ws:
        ws.send(frame(sleeper, directory=str(tmp_path), seconds=30).decode())
        assert json.loads(ws.recv(timeout=10))["type"] == "task_started"
        pid_file = wait_until(lambda: next(tmp_path.glob("pid-*"), None), 15, "the task")
    pid = int(pid_file.name.split("-")[1])
    wait_until(lambda: not pid_alive(pid), 10, "the abandoned task's process to end")
    wait_until(lambda: served.health()["runs"]["cancelled"] == 1, 10, "the run cancelled")
    assert os.path.exists(pid_file) and not (tmp_path / "done").exists()


def test_doctor_probes_the_service(serve: Callable[..., Any], run_cli: Callable[..., Any],
                                   tmp_path: Path) -> None:
    served = serve("grpc", security="signed")
    done = run_cli("doctor", env={"WOVE_ADAPTERS_SERVE_URL": served.health_url[:-len("healthz")]})
    assert "ok    serve /healthz: grpc signed, running 0/" in done.stdout, done.stdout
    done = run_cli("doctor", env={"WOVE_ADAPTERS_SERVE_URL": served.target})
    assert "ok    serve reachable" in done.stdout, done.stdout
    served.terminate(30)
    done = run_cli("doctor", env={"WOVE_ADAPTERS_SERVE_URL": served.target})
    assert done.returncode == 1 and "FAIL  serve reachable" in done.stdout, done.stdout
