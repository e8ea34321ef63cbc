"""Issue 11, points 3 and 4: a run id is a durable promise, whatever happens to the caller.

- A receiver that does not follow a run says so (``404 {"unknown": [...]}``), never
  ``200``: the worker then records the outcome in the run's ledger at once.
- A caller killed with SIGKILL while its runs execute, and restarted at once on the same
  ``callback_port`` and ``callback_token`` (which used to answer ``200 {"routed": 0}``
  and swallow every old outcome): every old run's result is fetchable from the ledger.
- A caller killed 0.3 s after ``submit`` returned, with each shareable ledger (SQLite,
  PostgreSQL, Redis): every run that executed is fetchable (claims are committed before
  their jobs launch).

Real ``process`` workers (one OS process per task, in its own session, so it outlives
the caller), real callers in subprocesses, real ledgers. Counts are printed and asserted:
lost 0, wrong 0. ``WOVE_TEST_SOURCE`` points the callers and workers at another source
tree (to measure a version before a fix).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import frames, signing
from wove_adapters.worker import sender

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import shared_servers

ROOT = Path(__file__).resolve().parents[3]
SOURCE = os.environ.get("WOVE_TEST_SOURCE", str(ROOT))

# A caller program. ``submit``: submit N sleepy runs, write their ids (as submit returns
# them) and say so, then wait to be killed. ``fetch``: start the environment (its
# receiver binds the same port and token), then fetch every listed run's result from the
# ledger within a bound, and print what it got and what its receiver saw.
CALLER = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {source!r})
    from wove_adapters import Hub
    from wove_adapters.testing import tasks

    cfg = json.loads(sys.argv[1])
    sys.path.insert(0, cfg["dir"])
    task = tasks.sleepy
    if cfg.get("gated"):
        from gated_tasks import gated as task
    hub = Hub(
        environments={{"p": {{"executor": "process", "executor_config": cfg["executor_config"]}}}},
        default_environment="p",
        ledger=cfg["ledger"],
        **cfg["settings"],
    )
    if cfg["mode"] == "submit":
        with open(cfg["ids"], "w") as out:
            for i in range(cfg["n"]):
                future = hub.submit(task, cfg["dir"], f"r{{i}}", cfg["seconds"])
                out.write(future.run_id + "\\n")
                out.flush()
        print("submitted", flush=True)
        time.sleep(600)
    else:
        receiver = hub.dispatcher("p").transport.receiver
        print("ready", flush=True)
        ids = open(cfg["ids"]).read().split()
        deadline = time.monotonic() + cfg["bound"]
        results = {{}}
        for run_id in ids:
            try:
                value = hub.result(run_id, timeout=max(deadline - time.monotonic(), 0.1))
                results[run_id] = ["ok", value]
            except BaseException as exc:
                results[run_id] = ["error", f"{{type(exc).__name__}}: {{exc}}"[:300]]
        stats = dict(receiver.stats) if receiver is not None else {{}}
        print(json.dumps({{"results": results, "receiver": stats}}), flush=True)
        hub.close()
    """
)


# Starts, waits until the test says "go" (the restarted caller is listening), then sleeps
# and finishes: every run is in flight when the first caller dies, whatever the machine's
# speed.
GATED = textwrap.dedent(
    """
    import os, time
    from pathlib import Path

    def gated(directory, tag, seconds):
        Path(directory, tag + ".started").write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while not Path(directory, "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(seconds)
        Path(directory, tag + ".finished").write_text(str(os.getpid()))
        return tag
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Caller:
    """A caller program; its output goes to files, since its worker processes inherit
    them and outlive it (a pipe would keep a killed caller's output open)."""

    def __init__(self, cfg: dict[str, Any], home: Path) -> None:
        env = {**os.environ, "WOVE_ADAPTERS_HOME": str(home), "PYTHONPATH": SOURCE}
        base = Path(cfg["dir"]).parent / f"caller-{uuid.uuid4().hex[:6]}"
        self.out, self.err = base.with_suffix(".out"), base.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CALLER.format(source=SOURCE), json.dumps(cfg)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, text=True, env=env,
            )

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines()

    def wait_line(self, expected: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if expected in (line.strip() for line in self.lines()):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"the caller never said {expected!r}: {self.err.read_text()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def finish(self, timeout: float) -> dict[str, Any]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the caller hung: {self.err.read_text()[-3000:]}")
        assert self.proc.returncode == 0, self.err.read_text()[-3000:]
        return dict(json.loads(self.lines()[-1]))


def _started(directory: Path) -> set[str]:
    return {path.stem for path in directory.glob("*.started")}


def _finished(directory: Path) -> set[str]:
    return {path.stem for path in directory.glob("*.finished")}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A private home (keys, spool), a marker directory and a free fixed port/token."""
    markers = tmp_path / "markers"
    markers.mkdir()
    (markers / "gated_tasks.py").write_text(GATED)
    yield {
        "home": tmp_path / "home",
        "dir": markers,
        "ids": tmp_path / "run_ids.txt",
        "port": _free_port(),
        "token": uuid.uuid4().hex,
    }


def _config(box: dict[str, Any], ledger: str, mode: str, policy: str, **extra: Any) -> dict:
    return {
        "mode": mode,
        "ledger": ledger,
        "ids": str(box["ids"]),
        "dir": str(box["dir"]),
        "executor_config": {
            "callback_port": box["port"],
            "callback_token": box["token"],
            "env": {"PYTHONPATH": os.pathsep.join([SOURCE, str(box["dir"])])},
            # Workers of a dead caller record the outcome and exit soon.
            "worker_exit_flush_seconds": 2,
        },
        "settings": {"delivery_orphan_policy": policy},
        **extra,
    }


def _fetch(
    box: dict[str, Any], ledger: str, policy: str, bound: float, *, go: bool = False
) -> dict[str, Any]:
    fetcher = Caller(_config(box, ledger, "fetch", policy, bound=bound), box["home"])
    if go:  # listening on the old port: now let the old runs finish
        fetcher.wait_line("ready", 120)
        (box["dir"] / "go").write_text("")
    return fetcher.finish(bound + 120)


def _report(title: str, counts: dict[str, Any]) -> None:
    print(f"\n{title}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))


# ---------------------------------------------------------------- the receiver's answer


def _batch(run_id: str, key_id: str) -> bytes:
    event = frames.TaskResult(run_id=run_id, task_id="t", attempt=1, result=b"\x80\x04K\x07.")
    return signing.encode_blob(sender.sign_events([event], key_id))


async def test_receiver_answers_unknown_runs_and_routes_known_ones() -> None:
    import aiohttp

    receiver = CallbackReceiver()
    await receiver.start()
    got: list[str] = []
    receiver.register("known", lambda event, raw: got.append(event.run_id))
    key_id = signing.KEYRING.generate()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(receiver.url, data=_batch("known", key_id)) as answer:
                assert answer.status == 200, await answer.text()
            async with session.post(receiver.url, data=_batch("nobody", key_id)) as answer:
                assert answer.status == 404
                assert (await answer.json())["unknown"] == ["nobody"]
            # A retry of the refused event is refused again (never a "duplicate" 200).
            async with session.post(receiver.url, data=_batch("nobody", key_id)) as answer:
                assert answer.status == 404
            # Mixed: the known run is routed, the unknown one reported.
            events = [
                frames.Heartbeat(run_id="known", task_id="t"),
                frames.TaskResult(run_id="other", task_id="t", result=b"\x80\x04K\x07."),
            ]
            blob = signing.encode_blob(sender.sign_events(events, key_id))
            async with session.post(receiver.url, data=blob) as answer:
                body = await answer.json()
                assert (answer.status, body["unknown"], body["routed"]) == (404, ["other"], 1)
        assert got == ["known", "known"]
        assert receiver.stats["unknown_runs"] == 3
    finally:
        await receiver.aclose()


def _outbox_empty_within(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while sender.OUTBOX.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    return sender.OUTBOX.pending() == 0


async def test_sender_records_an_unknown_runs_outcome_in_the_ledger(tmp_path: Path) -> None:
    """The worker's side: "unknown run" is not delivered; the outcome goes to the ledger at
    once (no retries), and the run's record is created if it is missing."""
    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.ledger import open_ledger
    from wove_adapters.worker import runner as worker

    receiver = CallbackReceiver()
    await receiver.start()
    ledger_url = f"sqlite:///{tmp_path / 'runs.db'}"
    run_id = f"t:{uuid.uuid4().hex}"
    envelope = payload_mod.Envelope(
        adapter="process", run_id=run_id, task_id="t", environment="p",
        return_path=payload_mod.ReturnPath(kind="http", url=receiver.url),
        key_id=signing.KEYRING.generate(), ledger=ledger_url,
    )
    event = frames.TaskResult(run_id=run_id, task_id="t", result=payload_mod.dumps(42))
    try:
        started = time.monotonic()
        assert await asyncio.to_thread(worker.deliver_terminal, envelope, event) is True
        elapsed = time.monotonic() - started
        record = await open_ledger(ledger_url).get(run_id)
        assert record is not None and record.state == "succeeded", record
        assert record.environment == "p"
        from wove_adapters.core.codec import decode_outcome

        assert decode_outcome(record.outcome or b"", run_id)["result"] == 42
        assert elapsed < 5, elapsed
        # Not retried: refused within the grace, the outbox never sees it; answered
        # later (a loaded machine), the outbox gives it up at that answer.
        assert await asyncio.to_thread(_outbox_empty_within, 5.0)
    finally:
        await receiver.aclose()


# ---------------------------------------------------------------- restarted caller


@pytest.mark.parametrize("policy", ["requeue", "fail"])
def test_restarted_caller_on_the_same_port_fetches_every_old_run(
    sandbox: dict[str, Any], policy: str, tmp_path: Path
) -> None:
    n, seconds, bound = 50, 1.0, 90.0
    ledger = f"sqlite:///{tmp_path / 'runs.db'}"
    first = Caller(
        _config(sandbox, ledger, "submit", policy, n=n, seconds=seconds, gated=True),
        sandbox["home"],
    )
    try:
        first.wait_line("submitted", 120)
        # Kill it while every run executes (each waits for "go", then sleeps).
        deadline = time.monotonic() + 120
        while len(_started(sandbox["dir"])) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        first.kill()
    finished_at_kill = len(_finished(sandbox["dir"]))
    started_at_kill = len(_started(sandbox["dir"]))
    # The new caller starts at once on the same port and token; then the runs finish.
    got = _fetch(sandbox, ledger, policy, bound, go=True)
    results = got["results"]
    ok = {run_id for run_id, (kind, _) in results.items() if kind == "ok"}
    wrong = [run_id for run_id, (kind, value) in results.items()
             if kind == "ok" and not str(value).startswith("r")]
    errors = {run_id: value for run_id, (kind, value) in results.items() if kind != "ok"}
    _report(f"restarted caller ({policy})", {
        "runs": n, "started at kill": started_at_kill, "finished at kill": finished_at_kill,
        "fetched": len(ok), "lost": len(errors), "wrong": len(wrong),
        "answered unknown": got["receiver"].get("unknown_runs", "n/a"),
    })
    assert started_at_kill == n
    assert not errors, list(errors.items())[:5]
    assert not wrong
    assert len(ok) == n
    # Every run's value is its own tag: no run answered with another's outcome.
    assert sorted(str(results[r][1]) for r in ok) == sorted(f"r{i}" for i in range(n))


# ---------------------------------------------------------------- caller killed after submit


def _ledger_url(kind: str, tmp_path: Path) -> tuple[str, Any]:
    """A fresh ledger of this kind and its cleanup (``shared_servers.ledger``); a missing
    server fails, saying how to start it."""
    cleanup = contextlib.ExitStack()
    name = f"wove_kill_{uuid.uuid4().hex[:10]}"
    url = cleanup.enter_context(shared_servers.ledger(kind, name, tmp_path, suite="core"))
    return url, cleanup.close


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "redis"])
def test_caller_killed_after_submit_leaves_every_executed_run_fetchable(
    sandbox: dict[str, Any], kind: str, tmp_path: Path
) -> None:
    n, seconds = 25, 0.5
    ledger, clean = _ledger_url(kind, tmp_path)
    try:
        first = Caller(_config(sandbox, ledger, "submit", "fail", n=n, seconds=seconds),
                        sandbox["home"])
        try:
            first.wait_line("submitted", 120)
            time.sleep(0.3)
            # On a loaded machine nothing may have launched yet: then kill it as soon as
            # the first run starts, so that the scenario is never vacuous.
            deadline = time.monotonic() + 30
            while not _started(sandbox["dir"]) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            first.kill()
        # Let every launched worker finish (it records its outcome: no caller answers):
        # done when every started run has finished and none started for 3 s.
        deadline, quiet_since, seen = time.monotonic() + 120, time.monotonic(), -1
        while time.monotonic() < deadline:
            started = _started(sandbox["dir"])
            if len(started) != seen:
                seen, quiet_since = len(started), time.monotonic()
            if not started - _finished(sandbox["dir"]) and time.monotonic() - quiet_since > 3:
                break
            time.sleep(0.1)
        executed = _finished(sandbox["dir"])
        sandbox["port"] = _free_port()  # a new caller, anywhere: it only reads the ledger
        got = _fetch(sandbox, ledger, "fail", 10.0)
        results = got["results"]
        by_tag = {str(value): run_id for run_id, (kind_, value) in results.items()
                  if kind_ == "ok"}
        lost = sorted(tag for tag in executed if tag not in by_tag)
        missing = sum(1 for _, value in results.values() if "not in the ledger" in str(value))
        _report(f"caller killed 0.3 s after submit ({kind})", {
            "runs": n, "executed": len(executed), "fetched": len(by_tag),
            "lost": len(lost), "not in the ledger": missing,
        })
        assert executed, "no run executed: the caller died before launching any"
        assert not lost, (lost[:5], [results[r] for r in list(results)[:3]])
    finally:
        clean()



# ---------------------------------------------------------------- an occupied port


def test_an_occupied_callback_port_says_where_and_what_to_change(tmp_path: Path) -> None:
    import errno

    from wove_adapters import Hub
    from wove_adapters.callbacks.receiver import CallbackAddressError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        hub = Hub(
            environments={"reports": {"executor": "process", "executor_config": {
                "callback_port": port, "callback_token": uuid.uuid4().hex}}},
            default_environment="reports",
            ledger=f"sqlite:///{tmp_path / 'runs.db'}",
        )
        try:
            with pytest.raises(CallbackAddressError) as raised:
                hub.dispatcher("reports")
        finally:
            hub.close()
    message = str(raised.value)
    assert "Environment 'reports'" in message, message
    assert f"127.0.0.1:{port}" in message, message
    assert "executor_config.callback_port" in message, message
    assert raised.value.errno == errno.EADDRINUSE
    assert isinstance(raised.value.__cause__, OSError)
    assert raised.value.__cause__.errno == errno.EADDRINUSE
