"""Issue 11, point 5: a worker never spends its slot on a caller that is gone.

A worker with two slots (two threads calling ``wove_adapters.worker.run``, which is what
the Celery thread pool, Dask and ARQ/Taskiq workers do per job) has 20 jobs queued for a
caller that is gone, then one for a live caller. Measured: how long until it runs that
other work, and where the dead caller's 20 outcomes went.

- the caller was killed: its port refuses connections; each outcome goes to the ledger at
  once and the slot is free at once.
- the caller is paused (SIGSTOP): the kernel still accepts connections, nothing answers.
  An inline try costs at most its budget (1 s), and never queues behind the background
  retry of another event, so the queue drains at once after the first try or two.

Real receivers (the live caller's and a paused caller's, in its own process), a real
worker process, a real SQLite ledger; no part of ours is replaced. ``WOVE_TEST_SOURCE``
points the worker at another source tree (to measure a version before a fix).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from wove_adapters.callbacks.receiver import CallbackReceiver
from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.core.codec import decode_outcome
from wove_adapters.core.ledger import RunRecord, open_ledger
from wove_adapters.testing import tasks

ROOT = Path(__file__).resolve().parents[3]
SOURCE = os.environ.get("WOVE_TEST_SOURCE", str(ROOT))
QUEUED = 20

# Two slots; every job prints when it started and ended (seconds since the worker began).
WORKER = textwrap.dedent(
    """
    import concurrent.futures, json, sys, threading, time
    sys.path.insert(0, {source!r})
    from wove_adapters import worker

    jobs = json.load(open(sys.argv[1]))
    start = time.monotonic()
    lock = threading.Lock()

    def job(label, text):
        began = time.monotonic() - start
        state = worker.run(text).state
        line = json.dumps([label, began, time.monotonic() - start, state])
        with lock:
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for label, text in jobs:
            pool.submit(job, label, text)
    """
)

# A caller that will be paused: its receiver listens, then nothing answers.
PAUSED = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {source!r})
    from wove_adapters.callbacks.receiver import CallbackReceiver

    async def main():
        receiver = CallbackReceiver(port=int(sys.argv[1]), token="t")
        await receiver.start()
        print("ready", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _payload(run_id: str, url: str, key_id: str, ledger: str, x: int) -> str:
    envelope = payload_mod.build_envelope(
        adapter="celery", run_id=run_id, task_id="add", attempt=1, func=tasks.add,
        args={"x": x}, return_path=payload_mod.ReturnPath(kind="http", url=url),
        delivery={}, key_id=key_id, inline_limit=1 << 20, store_url=None, ledger=ledger,
        environment="gone",
    )
    return payload_mod.encode_payload(envelope)


async def _python(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )


@pytest.mark.parametrize("caller", ["killed", "paused"])
async def test_a_gone_caller_does_not_hold_the_slots(tmp_path: Path, caller: str) -> None:
    secret = uuid.uuid4().hex
    key_id = signing.KEYRING.add(secret.encode())
    env = {**os.environ, signing.SECRET_ENV: secret, "WOVE_ADAPTERS_HOME": str(tmp_path)}
    ledger_url = f"sqlite:///{tmp_path / 'runs.db'}"
    ledger = open_ledger(ledger_url)
    live = CallbackReceiver()
    await live.start()
    arrived = asyncio.Event()
    live_id = f"add:{uuid.uuid4().hex}"
    live.register(live_id, lambda event, raw: arrived.set())
    paused = None
    try:
        if caller == "paused":
            port = _closed_port()
            paused = await _python(PAUSED.format(source=SOURCE), str(port), env=env)
            assert paused.stdout is not None
            line = await asyncio.wait_for(paused.stdout.readline(), 60)
            assert line.strip() == b"ready", (line, await paused.stderr.read())  # type: ignore[union-attr]
            os.kill(paused.pid, signal.SIGSTOP)
            gone_url = f"http://127.0.0.1:{port}/wove/events/t"
        else:
            gone_url = f"http://127.0.0.1:{_closed_port()}/wove/events/t"
        gone_ids = [f"add:{uuid.uuid4().hex}" for _ in range(QUEUED)]
        for run_id in gone_ids:
            await ledger.claim(RunRecord(run_id=run_id, environment="gone", adapter="celery"))
        jobs = [
            [run_id, _payload(run_id, gone_url, key_id, ledger_url, i)]
            for i, run_id in enumerate(gone_ids)
        ]
        jobs.append(["live", _payload(live_id, live.url, key_id, ledger_url, 41)])
        (tmp_path / "jobs.json").write_text(json.dumps(jobs))
        started = time.monotonic()
        worker = await _python(
            WORKER.format(source=SOURCE), str(tmp_path / "jobs.json"), env=env
        )
        await asyncio.wait_for(arrived.wait(), 120)
        live_delivered = time.monotonic() - started
        out, err = await asyncio.wait_for(worker.communicate(), 120)
        assert worker.returncode == 0, err.decode()[-3000:]
        worker_exited = time.monotonic() - started
        rows = [json.loads(line) for line in out.decode().splitlines()]
        live_began = next(began for label, began, _, _ in rows if label == "live")
        held = max(end - began for label, began, end, _ in rows if label != "live")
        records = [await ledger.get(run_id) for run_id in gone_ids]
        recorded = [r for r in records if r is not None and r.outcome is not None]
        values = sorted(decode_outcome(r.outcome or b"", r.run_id)["result"] for r in recorded)
        print(
            f"\ncaller {caller}, {QUEUED} queued jobs on 2 slots: the other work ran after "
            f"{live_began:.2f}s (delivered {live_delivered:.2f}s after the worker started), "
            f"longest slot held by one job {held:.2f}s, outcomes recorded {len(recorded)} "
            f"of {QUEUED}, worker exited after {worker_exited:.2f}s"
        )
        assert len(recorded) == QUEUED, [r.state if r else None for r in records]
        assert values == [x + 1 for x in range(QUEUED)]
        assert live_began < 5.0, live_began
        assert held < 2.5, held
        # Recorded outcomes do not hold the process at exit either.
        assert worker_exited < 20, worker_exited
    finally:
        await live.aclose()
        if paused is not None:
            os.kill(paused.pid, signal.SIGCONT)
            paused.kill()
            await paused.wait()
        await ledger.aclose()
