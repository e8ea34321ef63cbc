"""A Redis writer cannot run code in an ``arq`` caller (issue 13, item 1).

ARQ pickles job data and results by default. A Redis writer plants pickles that create a
marker file when unpickled (``broker_planting.Bomb``) in every key the caller might read
(ARQ's job, result, in-progress and retry keys, our record of what a job ended with),
under the id an idempotency key names or over the caller's own queued job. The caller
then submits, follows, reads status, cancels and times out: the marker must never
appear, and each run ends with a clear error or as lost, in bounded time. Planted jobs
are never on a queue a worker reads. Run with the arq tox env.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "arq"))
from arq_services import PREFIX, SESSION, cleanup_session, environment, redis_client, require_redis
from broker_planting import bomb, caller, keyed, new_key
from run_ends import cancel_ends, ends_lost, ends_within, tampered_ends
from services import scratch_queue

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.worker.arq import RESULT_KEY, pack_record

BOUND = 30.0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue no worker reads."""
    yield from scratch_queue(f"{SESSION}-sec", require_redis, lambda _: cleanup_session())


def _caller(queue: str, marker: Path, **policy: Any) -> contextlib.AbstractContextManager[Hub]:
    config = environment(queue_name=queue, lease_seconds=1.0)["executor_config"]
    return caller(marker, "arq", config, BOUND, **policy)


def _plant(job_id: str, marker: Path, *, record: bytes | None = None,
           in_progress: bool = False) -> None:
    with redis_client() as client:
        client.set(f"arq:job:{job_id}", bomb(marker))
        client.set(f"arq:retry:{job_id}", bomb(marker))
        if in_progress:
            client.set(f"arq:in-progress:{job_id}", b"1")
        else:
            client.set(f"arq:result:{job_id}", bomb(marker))
        client.set(RESULT_KEY + job_id, bomb(marker) if record is None else record)


@pytest.mark.parametrize("record", ["pickle", "failed", "forged-outcome"])
def test_following_a_planted_complete_job_never_unpickles(
    queue: str, marker: Path, record: str
) -> None:
    key = new_key()
    planted = {
        "pickle": None,  # our record is a pickle too: not msgpack, an unreadable record
        "failed": pack_record({"state": "failed"}),  # ended badly: the key is free again
        "forged-outcome": pack_record({"state": "succeeded", "outcome": bomb(marker)}),
    }[record]
    _plant(PREFIX + key, marker, record=planted)
    with _caller(queue, marker) as hub:
        future = keyed(hub, key)
        if record == "failed":  # ours replaces it (no worker here): cancel it
            time.sleep(0.5)
            cancel_ends(hub, future, BOUND)
        else:
            ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
            assert isinstance(ended, Exception), repr(ended)


def test_planted_running_job_without_a_lease_is_lost(queue: str, marker: Path) -> None:
    key = new_key()
    _plant(PREFIX + key, marker, in_progress=True)
    with _caller(queue, marker) as hub:
        ends_lost(keyed(hub, key), BOUND)


@pytest.mark.parametrize("how", ["cancel", "timeout", "status"])
def test_tampered_own_job_never_unpickles(queue: str, marker: Path, how: str) -> None:
    """The writer plants a pickled result (and job, record) over the caller's own queued
    job; the caller then cancels it, times it out, or reads its status and outcome."""
    with _caller(queue, marker, **({"delivery_timeout": 3.0} if how == "timeout" else {})) as hub:
        future = hub.submit(tasks.add, 1, 2)
        with redis_client() as client:
            for _ in range(200):
                ids = [m.decode() for m in client.zrange(queue, 0, -1)]
                if ids:
                    break
                time.sleep(0.05)
        assert ids, "the caller's job never reached the queue"
        _plant(ids[0], marker)

        def status() -> None:
            adapter = hub.dispatcher("arq").transport.adapter
            states = shared_loop.run_sync(adapter.status_many([ids[0]]))
            assert states.get(ids[0]) is not JobState.SUCCEEDED
            outcome = shared_loop.run_sync(adapter.outcomes([ids[0]]))[ids[0]]
            assert isinstance(outcome, Exception), outcome

        tampered_ends(how, hub, future, BOUND, status)
