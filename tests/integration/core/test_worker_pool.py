"""The one warm payload process pool (``wove_adapters.worker.pool``) that Taskiq, ARQ
(``isolation="process"``) and Temporal workers share, driven directly with real signed
payloads: a fresh process per payload forked from the zygote, its signed outcome kept,
a crash reported with pid and signal, SIGTERM then SIGKILL, a waiting payload cancelled
before it starts. The backends' own suites cover the pool inside their workers (a killed
worker takes its payload processes with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.core.codec import decode_outcome
from wove_adapters.worker.pool import PoolRun, ProcessPool


def answer(x: int) -> int:
    return x * 2


def crash(how: str) -> None:
    if how == "abort":
        os.abort()
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_for(seconds: float, stubborn: bool = False) -> str:
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)
    return "woke"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _payload(tmp_path: Path, func: Any, **args: Any) -> str:
    """A signed payload whose caller is gone (its outcome goes to a SQLite ledger)."""
    envelope = payload_mod.build_envelope(
        adapter="pool-test", run_id=f"pool:{uuid.uuid4().hex}", task_id=func.__name__,
        attempt=1, func=func, args=args,
        return_path=payload_mod.ReturnPath(kind="http", url=f"http://127.0.0.1:{_closed_port()}"),
        delivery={}, key_id=signing.KEYRING.generate(), inline_limit=1 << 20, store_url=None,
        ledger=f"sqlite:///{tmp_path / 'runs.db'}", retry_seconds=1.0, retry_attempts=2,
        exit_flush_seconds=0.2,
    )
    return payload_mod.encode_payload(envelope)


async def _started(run: PoolRun) -> None:
    for _ in range(3000):  # 30 s
        if run.pid is not None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the payload process did not start within 30 s")


def _parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_each_payload_gets_a_fresh_process_from_the_zygote(tmp_path: Path) -> None:
    async def main() -> None:
        async with ProcessPool(2) as pool:
            runs = [pool.run(_payload(tmp_path, answer, x=i), keep_outcome=True)
                    for i in range(4)]
            parents = set()
            outcomes = []
            for run in runs:
                outcomes.append(await run)
            for i, outcome in enumerate(outcomes):
                assert outcome.state == "succeeded", outcome
                assert outcome.outcome is not None and outcome.notice is None
                assert decode_outcome(outcome.outcome)["result"] == 2 * i
            pids = {outcome.pid for outcome in outcomes}
            assert len(pids) == 4 and os.getpid() not in pids
            for pid in pids:
                assert pid is not None
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    parents.add(_parent_of(pid))  # still settling, or gone
            assert parents <= {pool.zygote_pid}

    asyncio.run(main())


def test_a_crash_is_reported_with_pid_and_signal(tmp_path: Path) -> None:
    async def main() -> None:
        async with ProcessPool(2) as pool:
            aborted = await pool.run(_payload(tmp_path, crash, how="abort"))
            killed = await pool.run(_payload(tmp_path, crash, how="kill"))
            after = await pool.run(_payload(tmp_path, answer, x=1))
        assert aborted.state == "lost" and aborted.exit_code == -signal.SIGABRT
        assert f"pid {aborted.pid}" in str(aborted.notice) and "SIGABRT" in str(aborted.notice)
        assert killed.state == "lost" and killed.exit_code == -signal.SIGKILL
        assert "SIGKILL" in str(killed.notice)
        assert after.state == "succeeded"  # the pool lives on

    asyncio.run(main())


def test_cancel_sigterm_then_sigkill_and_a_waiting_payload_never_starts(tmp_path: Path) -> None:
    async def main() -> None:
        async with ProcessPool(1, kill_after=0.5) as pool:
            running = pool.run(_payload(tmp_path, sleep_for, seconds=60.0))
            waiting = pool.run(_payload(tmp_path, answer, x=3))
            await _started(running)
            waiting.cancel()
            assert (await waiting).notice == "cancelled before it started"
            await asyncio.sleep(0.3)  # inside the task
            started = time.monotonic()
            running.cancel()
            outcome = await running
            assert outcome.state == "cancelled" and outcome.report, outcome  # the runner said
            assert time.monotonic() - started < 10

            stubborn = pool.run(_payload(tmp_path, sleep_for, seconds=60.0, stubborn=True))
            await _started(stubborn)
            await asyncio.sleep(0.3)
            started = time.monotonic()
            stubborn.cancel()
            outcome = await stubborn
            assert outcome.state == "cancelled" and outcome.exit_code == -signal.SIGKILL
            assert "killed after cancellation" in str(outcome.notice)
            assert 0.4 < time.monotonic() - started < 10

    asyncio.run(main())


def test_reuse_keeps_a_process_warm_and_replaces_a_dead_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with ProcessPool(1, reuse=True) as pool:
            first = await pool.run(_payload(tmp_path, answer, x=1))
            second = await pool.run(_payload(tmp_path, answer, x=2))
            assert first.state == second.state == "succeeded"
            assert first.pid == second.pid  # the same warm process served both
            crashed = await pool.run(_payload(tmp_path, crash, how="kill"))
            assert crashed.pid == first.pid and crashed.state == "lost"
            assert crashed.exit_code == -signal.SIGKILL
            after = await pool.run(_payload(tmp_path, answer, x=3))
            assert after.state == "succeeded" and after.pid != first.pid
            assert after.pid is not None and _parent_of(after.pid) == pool.zygote_pid
            # An idle process that died is replaced without losing the payload.
            os.kill(after.pid, signal.SIGKILL)
            await asyncio.sleep(0.2)
            again = await pool.run(_payload(tmp_path, answer, x=4))
            assert again.state == "succeeded" and again.pid not in (after.pid, None)

    asyncio.run(main())
