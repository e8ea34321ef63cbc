"""Point 5 of issue 10 for a worker process that exits right after its task
(``python -m wove_adapters.worker``: the process, Slurm, Kubernetes and AWS Batch
adapters): when the caller is gone it neither lingers for the old 120 s nor exits with
the outcome unsaved. It records the outcome in the run's ledger and exits within its
configured bounds; when the caller is there, it delivers inline and exits at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import signing
from wove_adapters.core.codec import decode_outcome
from wove_adapters.core.ledger import RunRecord, open_ledger


def triple(x: int) -> int:
    return 3 * x


def _closed_port() -> int:
    """A loopback port nobody listens on (the caller went away)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _payload(tmp_path: Path, ledger_url: str, run_id: str, url: str) -> Path:
    envelope = payload_mod.build_envelope(
        adapter="process",
        run_id=run_id,
        task_id="triple",
        attempt=1,
        func=triple,
        args={"x": 14},
        return_path=payload_mod.ReturnPath(kind="http", url=url),
        delivery={},
        key_id=signing.KEYRING.generate(),
        inline_limit=1 << 20,
        store_url=None,
        ledger=ledger_url,
        retry_seconds=3.0,
        retry_attempts=5,
        exit_flush_seconds=0.5,
    )
    path = tmp_path / f"{run_id.replace(':', '_')}.payload"
    path.write_text(payload_mod.encode_payload(envelope))
    return path


def _worker(path: Path) -> tuple[int, float, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "wove_adapters.worker", "--payload-file", str(path)],
        capture_output=True, text=True, timeout=60, env=os.environ.copy(),
    )
    return proc.returncode, time.monotonic() - started, proc.stderr


async def _claim(ledger_url: str, run_id: str) -> None:
    await open_ledger(ledger_url).claim(RunRecord(run_id=run_id, environment="p"))


async def _record(ledger_url: str, run_id: str) -> RunRecord | None:
    return await open_ledger(ledger_url).get(run_id)


def test_exiting_worker_records_the_outcome_when_the_caller_is_gone(tmp_path: Path) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'runs.db'}"
    run_id = f"triple:{uuid.uuid4().hex}"
    asyncio.run(_claim(ledger_url, run_id))
    path = _payload(tmp_path, ledger_url, run_id,
                    f"http://127.0.0.1:{_closed_port()}/wove/events/gone")
    code, elapsed, stderr = _worker(path)
    assert code == 0, stderr  # the outcome is safe (recorded), so the run did not fail
    # Recorded at once, then at most exit_flush_seconds (0.5) for the caller to appear;
    # far below the retry budget (3 s) and the old fixed 120 s.
    assert elapsed < 2.5, (elapsed, stderr)
    record = asyncio.run(_record(ledger_url, run_id))
    assert record is not None and record.state == "succeeded", record
    assert record.outcome is not None
    frame = decode_outcome(record.outcome, run_id)
    assert frame["type"] == "task_result" and frame["result"] == 42


def test_exiting_worker_without_a_ledger_is_bounded_and_says_so(tmp_path: Path) -> None:
    """No ledger and no caller: the outcome is lost, which the worker says (exit code 3,
    one line on stderr) once its retry bounds are spent (here the 5 attempts, backing
    off 0.1 + 0.2 + 0.4 + 0.8 s, before the 3 s budget), not after 120 s."""
    run_id = f"triple:{uuid.uuid4().hex}"
    envelope_path = _payload(tmp_path, "", run_id,
                             f"http://127.0.0.1:{_closed_port()}/wove/events/gone")
    # An empty ledger URL is no ledger.
    code, elapsed, stderr = _worker(envelope_path)
    assert code == 3, stderr
    assert 1.2 < elapsed < 8.0, (elapsed, stderr)
    assert "is lost" in stderr and run_id in stderr and "after 5 attempts" in stderr
