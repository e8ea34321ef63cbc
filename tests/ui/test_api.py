"""The runs page's HTTP API without a browser: real runs made by a real Hub (stdio and
process executors, a SQLite ledger), read back through ``/api/runs``, a run's detail,
``/metrics`` and the live event stream; and the server's refusals (no token, a foreign
origin, a foreign Host name, a run it cannot reach)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from click.testing import CliRunner

from wove_adapters import Hub, ui
from wove_adapters.cli import main
from wove_adapters.core import frames, signing
from wove_adapters.core.codec import sign_events
from wove_adapters.core.config import load_config
from wove_adapters.core.ledger import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    RunRecord,
    open_ledger,
)
from wove_adapters.integration.environments import key_id_for_config
from wove_adapters.ui.server import check_settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from remote_errors import raise_line
from ui_runs import Client, hold, metric_values, state_of, until

TOKEN = "t0ken-for-the-runs-page-tests"


def double(x: int) -> int:
    return x * 2


def boom(x: int) -> int:
    raise ValueError(f"bad input {x}")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Runs in two environments (stdio, process): three succeeded, one failed, one held
    running until the module ends; and the page serving them."""
    base = tmp_path_factory.mktemp("ui-api")
    url = f"sqlite:///{base / 'runs.db'}"
    hub = Hub(ledger=url, environments={"east": {"executor": "stdio"},
                                        "west": {"executor": "process"}})
    marker = str(base / "release")
    ids: dict[str, str] = {}
    try:
        for name, env, fn, arg in (("a", "east", double, 1), ("b", "east", double, 2),
                                   ("c", "west", double, 3), ("boom", "west", boom, 4)):
            future = hub.submit(fn, arg, environment=env)
            ids[name] = future.run_id
            if fn is boom:
                with pytest.raises(ValueError):
                    future.result(timeout=60)
            else:
                assert future.result(timeout=60) == arg * 2
        held = hub.submit(hold, marker, environment="east")
        ids["held"] = held.run_id
        until(lambda: state_of(url, held.run_id) == RUNNING, "the held run running")
        server = ui.serve(hub=hub, listen="127.0.0.1:0", poll_seconds=0.2)
        try:
            yield {"hub": hub, "url": url, "ids": ids, "server": server,
                   "client": Client(server.url), "held": held, "marker": marker}
        finally:
            server.close()
    finally:
        Path(marker).touch()
        hub.close()


def test_runs_are_listed_newest_first_with_their_fields(made: dict[str, Any]) -> None:
    runs = made["client"].json("/api/runs")["runs"]
    ids = made["ids"]
    assert [r["run_id"] for r in runs] == [ids[n] for n in ("held", "boom", "c", "b", "a")]
    by_id = {r["run_id"]: r for r in runs}
    assert by_id[ids["a"]]["environment"] == "east"
    assert by_id[ids["a"]]["executor"] == "stdio"
    assert by_id[ids["c"]]["executor"] == "process"
    assert by_id[ids["boom"]]["state"] == FAILED and by_id[ids["boom"]]["task_id"] == "boom"
    assert by_id[ids["held"]]["state"] == RUNNING
    assert by_id[ids["held"]]["cancellable"] is True
    assert by_id[ids["a"]]["cancellable"] is False
    assert "ended" in by_id[ids["a"]]["cancel_note"]
    assert by_id[ids["b"]]["duration"] > 0 and by_id[ids["held"]]["duration"] is None


def test_filters_narrow_the_list(made: dict[str, Any]) -> None:
    client, ids = made["client"], made["ids"]

    def listed(**params: Any) -> list[str]:
        return [r["run_id"] for r in client.json("/api/runs", **params)["runs"]]

    assert listed(environment="west") == [ids["boom"], ids["c"]]
    assert listed(state="succeeded") == [ids["c"], ids["b"], ids["a"]]
    assert listed(task="double", environment="east") == [ids["b"], ids["a"]]
    assert listed(task="nothing-like-it") == []
    runs = {r["run_id"]: r for r in client.json("/api/runs")["runs"]}
    since = runs[ids["b"]]["created_at"]
    assert listed(since=since) == [ids["held"], ids["boom"], ids["c"], ids["b"]]
    assert listed(since=since, until=runs[ids["c"]]["created_at"]) == [ids["c"], ids["b"]]
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(runs[ids["a"]]["created_at"] - 1))
    assert len(listed(since=iso)) == 5  # ISO 8601 in UTC is accepted too
    assert listed(limit=2) == [ids["held"], ids["boom"]]


def test_pages_follow_the_cursor_without_gaps_or_repeats(made: dict[str, Any]) -> None:
    client = made["client"]
    everything = [r["run_id"] for r in client.json("/api/runs")["runs"]]
    seen: list[str] = []
    page = client.json("/api/runs", limit=2)
    while True:
        seen += [r["run_id"] for r in page["runs"]]
        if page["next_cursor"] is None:
            break
        page = client.json("/api/runs", limit=2, cursor=page["next_cursor"])
    assert seen == everything


async def test_the_cursor_keeps_runs_that_share_a_timestamp(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ties.db'}"
    ledger = open_ledger(url)
    for i in range(5):
        await ledger.claim(RunRecord(run_id=f"tie-{i}", environment="e", created_at=1000.0))
    await ledger.claim(RunRecord(run_id="older", environment="e", created_at=999.0))
    server = await ui.start(ledger=url, listen="127.0.0.1:0")
    try:
        client = Client(server.url)
        seen: list[str] = []
        params: dict[str, Any] = {"limit": 2}
        while True:
            page = await asyncio.to_thread(client.json, "/api/runs", **params)
            seen += [r["run_id"] for r in page["runs"]]
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
        assert sorted(seen[:5]) == [f"tie-{i}" for i in range(5)] and seen[5:] == ["older"]
    finally:
        await server.aclose()


def test_a_bad_parameter_is_refused_naming_it(made: dict[str, Any]) -> None:
    client = made["client"]
    for query, named in (("state=finished", "state='finished'"), ("limit=0", "limit='0'"),
                         ("since=yesterday", "since='yesterday'"), ("cursor=%21%21", "cursor"),
                         ("colour=red", "colour")):
        status, _, body = client.request("GET", f"/api/runs?{query}")
        assert status == 400 and named in json.loads(body)["error"], body


def test_a_failed_runs_detail_shows_the_remote_traceback(made: dict[str, Any]) -> None:
    run_id = made["ids"]["boom"]
    detail = made["client"].json(f"/api/runs/{run_id}")
    assert detail["where"] == {"environment": "west", "executor": "process",
                               "backend_handle": detail["submission"]}
    assert detail["submission"]  # the process executor's handle: the worker's pid
    outcome = detail["outcome"]
    assert outcome["status"] == "verified" and outcome["type"] == "error"
    assert outcome["error"]["kind"] == "ValueError"
    assert outcome["error"]["message"] == "bad input 4"
    assert f"line {raise_line(boom)}, in boom" in outcome["error"]["traceback"]
    assert detail["timings"]["submit_to_end"] > 0
    status, _, body = made["client"].request("GET", "/api/runs/no-such-run")
    assert status == 404 and "no-such-run" in json.loads(body)["error"]


def _planted(tmp_path: Path) -> tuple[frames.TaskError, Path]:
    """A TaskError whose pickled exception, if anyone unpickled it, creates a file."""
    planted = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self) -> Any:
            return (Path.touch, (planted,))

    event = frames.TaskError(
        run_id="trap", task_id="trap",
        error=frames.ErrorPayload(kind="KeyError", message="trap"),
        exception=cloudpickle.dumps(Trap()),
    )
    return event, planted


async def test_an_outcome_is_verified_and_never_unpickled(
    made: dict[str, Any], tmp_path: Path
) -> None:
    event, planted = _planted(tmp_path)
    ledger = open_ledger(made["url"])
    trusted = signing.encode_blob(sign_events([event], key_id_for_config({})))
    stranger = signing.KEYRING.add(b"another-secret-of-somebody-else-32b")
    forged = signing.encode_blob(sign_events([event], stranger))
    for run_id, outcome in (("trap", trusted), ("trap-forged", forged),
                            ("trap-garbage", b"\x00not a blob")):
        await ledger.claim(RunRecord(run_id=run_id, environment="east", task_id="trap",
                                     state=FAILED, outcome=outcome))
    try:
        client = made["client"]
        shown = await asyncio.to_thread(client.json, "/api/runs/trap")
        assert shown["outcome"]["status"] == "verified"
        assert shown["outcome"]["error"] == {"kind": "KeyError", "message": "trap",
                                             "traceback": "", "retryable": False,
                                             "source": "task"}
        for run_id in ("trap-forged", "trap-garbage"):
            shown = await asyncio.to_thread(client.json, f"/api/runs/{run_id}")
            assert shown["outcome"]["status"] == "unverifiable", shown
            assert "Nothing in it was read" in shown["outcome"]["note"]
        assert not planted.exists()
    finally:
        for run_id in ("trap", "trap-forged", "trap-garbage"):
            await ledger.delete(run_id)


def test_metrics_match_the_runs_made(made: dict[str, Any]) -> None:
    status, headers, body = made["client"].request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    values = metric_values(body.decode())
    assert values[("east", "stdio", SUCCEEDED)] == 2
    assert values[("east", "stdio", RUNNING)] == 1
    assert values[("west", "process", SUCCEEDED)] == 1
    assert values[("west", "process", FAILED)] == 1
    assert values[("west", "process", RUNNING)] == 0  # written as 0, not left out
    assert sum(values.values()) == 5
    summary = made["client"].json("/api/summary")
    assert summary["environments"] == ["east", "west"]
    assert summary["by_state"][SUCCEEDED] == 3


def test_metrics_without_prometheus_client_names_the_extra(
    made: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m.startswith("prometheus_client")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # an import now fails
    status, _, body = made["client"].request("GET", "/metrics")
    assert status == 501 and b"pip install 'wove-adapters[metrics]'" in body


class EventStream:
    """One ``/api/events`` stream, read an event at a time."""

    def __init__(self, client: Client, query: str) -> None:
        self.conn = http.client.HTTPConnection(client.host, client.port, timeout=30)
        self.conn.request("GET", f"/api/events?{query}")
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type") == "text/event-stream"

    def next(self) -> tuple[str, Any]:
        name, data = "", ""
        while True:
            line = self.response.readline().decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and name:
                return name, json.loads(data)


def test_live_events_send_the_window_then_what_changed(made: dict[str, Any]) -> None:
    held = made["ids"]["held"]
    east = EventStream(made["client"], f"environment=east&watch={held}")
    running = EventStream(made["client"], "state=running")
    try:
        first = dict([east.next(), east.next()])
        assert {r["run_id"] for r in first["runs"]} == {
            made["ids"][n] for n in ("held", "b", "a")}
        assert first["run"]["state"] == RUNNING
        name, rows = running.next()
        assert name == "runs" and [r["run_id"] for r in rows] == [held]
        Path(made["marker"]).touch()
        assert made["held"].result(timeout=60) == made["marker"]
        changed = dict([east.next(), east.next()])
        assert [r["run_id"] for r in changed["runs"]] == [held]
        assert changed["runs"][0]["state"] == SUCCEEDED
        assert changed["run"]["state"] == SUCCEEDED and not changed["run"]["cancellable"]
        # It no longer matches state=running: that page is told to drop it.
        assert running.next() == ("gone", [held])
    finally:
        east.conn.close()
        running.conn.close()


# ---------------------------------------------------------------- refusals


def test_cancel_reaches_runs_in_flight_here_only(made: dict[str, Any], tmp_path: Path) -> None:
    hub, client = made["hub"], made["client"]
    marker = str(tmp_path / "never")
    future = hub.submit(hold, marker, environment="west")
    ledger = open_ledger(made["url"])
    try:
        until(lambda: state_of(made["url"], future.run_id) is not None, "its record")
        origin = {"Origin": client.origin}
        status, _, body = client.request("POST", f"/api/runs/{future.run_id}/cancel", origin)
        assert status == 202, body
        with pytest.raises(Exception, match="cancel"):
            future.result(timeout=60)
        until(lambda: state_of(made["url"], future.run_id) == "cancelled", "cancelled")
        status, _, body = client.request("POST", f"/api/runs/{future.run_id}/cancel", origin)
        assert status == 409 and b"has ended" in body
        # A run in flight elsewhere (another process's Hub): the page says where to go.
        asyncio.run(ledger.claim(RunRecord(run_id="elsewhere", environment="east",
                                           state=RUNNING)))
        status, _, body = client.request("POST", "/api/runs/elsewhere/cancel", origin)
        assert status == 409 and b"not in flight in this process" in body
        assert client.json("/api/runs/elsewhere")["cancellable"] is False
    finally:
        Path(marker).touch()
        asyncio.run(ledger.delete("elsewhere"))


def test_a_post_from_another_origin_is_refused(made: dict[str, Any]) -> None:
    client, run_id = made["client"], made["ids"]["a"]
    path = f"/api/runs/{run_id}/cancel"
    for headers in ({}, {"Origin": "http://evil.example"},
                    {"Referer": "http://evil.example/page"},
                    {"Origin": f"{client.origin}.evil.example"}, {"Origin": "null"},
                    {"Origin": f"ftp://{client.host}:{client.port}"}):
        status, _, body = client.request("POST", path, headers)
        assert status == 403 and b"must come from this page" in body, (headers, body)
    # The same origin passes the check (and meets the next answer: the run has ended).
    behind_tls = f"https://{client.host}:{client.port}"  # a TLS proxy's page
    for headers in ({"Origin": client.origin}, {"Referer": f"{client.origin}/"},
                    {"Origin": behind_tls}):
        status, _, _ = client.request("POST", path, headers)
        assert status == 409


def test_a_foreign_host_name_is_refused_without_a_token(made: dict[str, Any]) -> None:
    client = made["client"]
    status, _, body = client.request("GET", "/api/runs", {"Host": "rebound.example:80"})
    assert status == 403 and b"loopback names only" in body
    status, _, _ = client.request("GET", "/api/runs", {"Host": f"localhost:{client.port}"})
    assert status == 200


def test_a_token_protected_server_refuses_requests_without_it(made: dict[str, Any]) -> None:
    server = ui.serve(hub=made["hub"], listen="127.0.0.1:0", token=TOKEN)
    try:
        client = Client(server.url)
        for path in ("/", "/api/runs", "/api/events", "/metrics", "/static/app.js"):
            status, _, body = client.request("GET", path)
            assert status == 401 and b"needs its token" in body, path
        status, _, _ = client.request("GET", "/api/runs", {"Authorization": "Bearer wrong"})
        assert status == 401
        status, _, _ = client.request("GET", "/api/runs", {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        status, _, _ = client.request("GET", "/?token=wrong")
        assert status == 401
        status, headers, _ = client.request("GET", f"/?token={TOKEN}")
        assert status == 303 and headers["Location"] == "/"  # the token leaves the URL
        cookie = headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, _, body = client.request("GET", "/api/runs", {"Cookie": cookie.split(";")[0]})
        assert status == 200 and json.loads(body)["runs"]
        # With a token, any Host name is answered (the token is the guard).
        status, _, _ = client.request("GET", "/api/runs", {
            "Authorization": f"Bearer {TOKEN}", "Host": "runs.example.org"})
        assert status == 200
    finally:
        server.close()


def test_beyond_loopback_a_token_is_required_to_start() -> None:
    with pytest.raises(ui.UIConfigError, match="--token TOKEN or set WOVE_ADAPTERS_UI_TOKEN"):
        check_settings("0.0.0.0:0", None)
    with pytest.raises(ui.UIConfigError, match="at least 16"):
        check_settings("0.0.0.0:0", "short")
    assert check_settings("0.0.0.0:0", TOKEN).token == TOKEN
    with pytest.raises(ui.UIConfigError, match="HOST:PORT"):
        check_settings("8766", None)
    result = CliRunner().invoke(main, ["ui", "--listen", "0.0.0.0:0", "--ledger", "memory://"],
                                env={"WOVE_ADAPTERS_UI_TOKEN": ""})
    assert result.exit_code == 1 and "WOVE_ADAPTERS_UI_TOKEN" in result.output


def test_the_page_and_its_files_are_served_with_a_strict_policy(made: dict[str, Any]) -> None:
    client = made["client"]
    status, headers, body = client.request("GET", "/")
    assert status == 200 and b'<script src="/static/app.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, body = client.request("GET", "/static/app.js")
    assert status == 200 and b"innerHTML" not in body.replace(b"never innerHTML", b"")
    for path in ("/static/../server.py", "/static/server.py", "/static/index.html"):
        assert client.request("GET", path)[0] == 404


def test_the_command_serves_the_ledger_until_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    asyncio.run(open_ledger(url).claim(RunRecord(run_id="from-cli", environment="e")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("WOVE__")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wove_adapters.cli", "ui", "--listen", "127.0.0.1:0",
         "--ledger", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, cwd=tmp_path)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("wove-adapters ui: http://127.0.0.1:"), line
        client = Client(line.split()[2])
        page = client.json("/api/runs")
        assert [r["run_id"] for r in page["runs"]] == ["from-cli"]
        assert page["ledger"] == open_ledger(url).url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_quick_runs_end_is_stamped_even_when_folded_into_its_insert() -> None:
    """A run that ends within the batch of its claim is written as one insert carrying its
    end (the dispatcher folds the writes, core.runtime._fold): its updated_at must still
    say when it last changed, or the page shows the run as taking no time."""
    from wove_adapters.core.ledger.base import SetOutcome, Update
    from wove_adapters.core.runtime import _fold

    then = time.time() - 60
    records = [RunRecord(run_id=f"quick-{i}", environment="e", created_at=then,
                         updated_at=then) for i in range(2)]
    left, folded = _fold([
        (records[0], "claim-0"), (Update("quick-0", {"state": RUNNING}), "update-0"),
        (records[1], "claim-1"), (SetOutcome("quick-1", SUCCEEDED, b"event"), "outcome-1"),
    ])
    assert [op for op, _ in left] == records and len(folded) == 2  # folded, both
    assert records[0].state == RUNNING and records[1].state == SUCCEEDED
    assert all(r.updated_at > then + 59 and r.created_at == then for r in records)


def test_the_page_refuses_a_shared_job_and_a_stdio_run_of_another_process(
    tmp_path: Path,
) -> None:
    """A page knowing only the configuration: a backend run that owns its job is
    cancellable; runs sharing one job (a chunk, followers of one key) are not, and say
    with whom; a stdio run of another process says why no other process can stop it."""
    url = f"sqlite:///{tmp_path / 'planted.db'}"
    config = load_config({"environments": {"queue": {"executor": "celery"},
                                           "pipes": {"executor": "stdio"}}}, cwd=tmp_path)
    ledger = open_ledger(url)
    planted = [
        RunRecord(run_id="chunk-a", environment="queue", adapter="celery", state=RUNNING,
                  submission="job-1"),
        RunRecord(run_id="chunk-b", environment="queue", adapter="celery", state=RUNNING,
                  submission="job-1"),
        RunRecord(run_id="own", environment="queue", adapter="celery", state=RUNNING,
                  submission="job-2"),
        RunRecord(run_id="piped", environment="pipes", adapter="stdio", state=RUNNING,
                  submission="4242"),
        RunRecord(run_id="unknown-env", environment="gone", adapter="celery",
                  state=RUNNING, submission="job-3"),
    ]
    for record in planted:
        asyncio.run(ledger.claim(record))
    server = ui.serve(config=config, ledger=url, listen="127.0.0.1:0", poll_seconds=0.2)
    try:
        client = Client(server.url)
        origin = {"Origin": client.origin}

        def rows() -> dict[str, Any]:
            return {r["run_id"]: r for r in client.json("/api/runs")["runs"]}

        shown = rows()
        assert shown["own"]["cancellable"] is True, shown["own"]["cancel_note"]
        assert shown["chunk-a"]["cancellable"] is False
        assert "shared with unfinished run chunk-b" in shown["chunk-a"]["cancel_note"]
        assert "chunk-a" in shown["chunk-b"]["cancel_note"]
        assert shown["piped"]["cancellable"] is False
        assert "'stdio' keeps its workers in the submitting process" in \
            shown["piped"]["cancel_note"]
        assert "not in this page's configuration" in shown["unknown-env"]["cancel_note"]
        status, _, body = client.request("POST", "/api/runs/chunk-a/cancel", origin)
        assert status == 409 and b"chunk-b" in body, body
        status, _, body = client.request("POST", "/api/runs/piped/cancel", origin)
        assert status == 409 and b"'stdio'" in body, body
        # Once its partner has ended, the run owns its job alone: the detail (and a
        # cancel) ask the ledger afresh; the list reuses an answer for a few seconds.
        asyncio.run(ledger.set_outcome("chunk-b", CANCELLED, None))
        assert client.json("/api/runs/chunk-a")["cancellable"] is True
        until(lambda: rows()["chunk-a"]["cancellable"], "the list to see chunk-a alone")
    finally:
        server.close()
