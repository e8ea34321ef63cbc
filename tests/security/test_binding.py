"""Keys are bound to what they sign, on every shared ledger (SQLite, Redis, PostgreSQL).

- a ledger writer cannot point idempotency key K at another run's genuine outcome: the key
  and task are inside the signed outcome and checked before anything is unpickled;
- the holder of one environment's secret (a sandbox) cannot resolve another environment's
  runs (a trusted one) with an outcome signed by its own key: nothing it wrote is unpickled.
"""

from __future__ import annotations

import pickle
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from wove_adapters import Hub
from wove_adapters.core import frames, signing
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.ledger import RunRecord, open_ledger
from wove_adapters.testing import tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import shared_servers


class Bomb:
    """Unpickling it creates a marker file: proof that a forged pickle ran in the caller."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh namespace on each shared ledger; cleaned up after."""
    name = f"wove_sec_{uuid.uuid4().hex[:10]}"
    with shared_servers.ledger(request.param, name, tmp_path, suite="security") as url:
        yield url


def _hub(ledger: str, **environments: dict[str, Any]) -> Hub:
    return Hub(environments=environments, default_environment=next(iter(environments)),
               ledger=ledger)


def test_a_key_cannot_be_pointed_at_another_runs_outcome(ledger_url: str) -> None:
    secret = f"binding-{uuid.uuid4().hex}"
    env = {"executor": "local", "executor_config": {"secret": secret}}
    key_a, key_b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
    with _hub(ledger_url, trusted=env) as hub:
        future = hub.submit(tasks.add, 41, task_options={"delivery_idempotency_key": key_a})
        assert future.result(timeout=30) == 42
        dispatcher = hub.dispatcher("trusted")
        shared_loop.run_sync(dispatcher.flush())
        genuine = shared_loop.run_sync(dispatcher.ledger.get(future.run_id))
        assert genuine is not None and genuine.outcome is not None
    # The ledger writer: in a ledger it controls, key B now names run A and its genuine
    # outcome (a copy of A's row under B's key).
    forged_ledger = open_ledger(ledger_url)
    row = RunRecord(run_id=genuine.run_id, environment="trusted", task_id=genuine.task_id,
                    idempotency_key=key_b, state="succeeded", outcome=genuine.outcome)
    shared_loop.run_sync(_replace_row(forged_ledger, row))
    with _hub(ledger_url, trusted=env) as hub:
        with pytest.raises(PayloadError, match="answers for idempotency key"):
            hub.run(tasks.add, 41, task_options={"delivery_idempotency_key": key_b})


async def _replace_row(ledger: Any, row: RunRecord) -> None:
    """Key B names run A: the old row of run A goes, a row under key B takes its id."""
    await ledger.delete(row.run_id)
    owner = await ledger.claim(msgspec.structs.replace(row, outcome=None, state="submitted"))
    assert owner.run_id == row.run_id
    await ledger.set_outcome(row.run_id, "succeeded", row.outcome)


def test_another_environments_key_cannot_resolve_a_run(ledger_url: str, tmp_path: Path) -> None:
    trusted_secret, sandbox_secret = f"t-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"
    marker = tmp_path / "pickle-ran-in-the-caller"
    hub = _hub(
        ledger_url,
        trusted={"executor": "local", "executor_config": {"secret": trusted_secret}},
        sandbox={"executor": "local", "executor_config": {"secret": sandbox_secret}},
    )
    with hub:
        run_id = f"trusted:{uuid.uuid4().hex}"
        ledger = open_ledger(ledger_url)
        shared_loop.run_sync(ledger.claim(RunRecord(run_id=run_id, environment="trusted",
                                                   task_id="add")))
        # The sandbox key holder (who may also write the ledger) records a result for the
        # trusted run: a pickle that would run code in whoever unpickles it.
        sandbox = signing.KEYRING.add(sandbox_secret.encode())
        forged = frames.TaskResult(run_id=run_id, task_id="add",
                                   result=pickle.dumps(Bomb(str(marker))))
        blob = signing.encode_blob(
            signing.sign(msgspec.msgpack.encode(frames.EventBatch(events=[forged])), sandbox)
        )
        shared_loop.run_sync(ledger.set_outcome(run_id, "succeeded", blob))
        with pytest.raises(PayloadError, match="does not trust"):
            hub.result(run_id, timeout=10)
        assert not marker.exists(), "a pickle signed with another environment's key ran"
        # The same record signed with the trusted key is read (the check can fail).
        trusted = signing.KEYRING.add(trusted_secret.encode())
        genuine = frames.TaskResult(run_id=run_id, task_id="add", result=pickle.dumps(42))
        run_b = f"trusted:{uuid.uuid4().hex}"
        shared_loop.run_sync(ledger.claim(RunRecord(run_id=run_b, environment="trusted",
                                                   task_id="add")))
        genuine = msgspec.structs.replace(genuine, run_id=run_b)
        good = signing.encode_blob(
            signing.sign(msgspec.msgpack.encode(frames.EventBatch(events=[genuine])), trusted)
        )
        shared_loop.run_sync(ledger.set_outcome(run_b, "succeeded", good))
        assert hub.result(run_b, timeout=10) == 42
