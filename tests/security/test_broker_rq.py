"""A Redis writer cannot run code in an ``rq`` caller (issue 13, item 1).

Whoever can write to RQ's Redis plants pickles that create a marker file when unpickled
(``broker_planting.Bomb``) in every field of a job hash the caller might read (data,
meta, result, the result stream, our outcome and state fields), under the id an
idempotency key names, or over the caller's own queued job. The caller then submits,
follows, reads status, cancels and times out; the marker must never appear, and each
run ends with a clear error or as lost, in bounded time. Run with the rq tox env.
"""

from __future__ import annotations

import contextlib
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "rq"))
from broker_planting import bomb, bomb_b64, caller, keyed, new_key
from rq_services import REDIS_URL, cleanup_queue, redis_client, require_redis
from run_ends import cancel_ends, ends_lost, ends_within, tampered_ends
from services import scratch_queue

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks

BOUND = 30.0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue no worker reads: planted and tampered jobs are only ever read by the caller."""
    yield from scratch_queue("wove-sec-rq", require_redis, _cleanup)


def _cleanup(name: str) -> None:
    client = redis_client()
    try:  # planted hashes go raw: RQ's own cleanup would unpickle them in this process
        for key in client.scan_iter("rq:job:*", count=1000):
            if client.hget(key, "origin") == name.encode():
                job_id = key.decode().split(":", 2)[2]
                client.delete(key, f"rq:results:{job_id}")
    finally:
        client.close()
    cleanup_queue(name)


def _caller(queue: str, marker: Path, **policy: Any) -> contextlib.AbstractContextManager[Hub]:
    return caller(marker, "rq", {"redis_url": REDIS_URL, "queue": queue}, BOUND, **policy)


def _plant(job_id: str, queue: str, marker: Path, **fields: Any) -> None:
    """A job hash as a Redis writer writes it: a pickle in every field that holds one."""
    with redis_client() as client:
        client.hset(f"rq:job:{job_id}", mapping={
            "data": zlib.compress(bomb(marker)), "meta": bomb(marker),
            "result": bomb(marker), "origin": queue, "created_at": "2026-01-01T00:00:00.000000Z",
            "description": "planted", "wove_outcome": bomb(marker), "wove_state": bomb(marker),
            **fields,
        })
        client.xadd(f"rq:results:{job_id}", {
            "type": "1", "return_value": bomb_b64(marker), "created_at": "2026-01-01T00:00:00Z",
        })


@pytest.mark.parametrize("status", ["finished", "failed", "stopped", "canceled"])
def test_following_a_planted_job_never_unpickles(queue: str, marker: Path, status: str) -> None:
    """A key whose job id holds a planted job: followed (finished) or replaced (ended)."""
    key = new_key()
    _plant(key, queue, marker, status=status)
    with _caller(queue, marker) as hub:
        future = keyed(hub, key)
        if status == "finished":  # followed: its outcome is unreadable, the run fails
            ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
            assert isinstance(ended, Exception), ended
            assert "recorded outcome" in str(ended) or "outcome" in str(ended), ended
        else:  # the ended job frees the key: ours is enqueued fresh, and cancelled
            cancel_ends(hub, future, BOUND)


def test_planted_running_job_with_a_gone_worker_is_lost(queue: str, marker: Path) -> None:
    key = new_key()
    _plant(key, queue, marker, status="started", worker_name="nobody-listens")
    with _caller(queue, marker) as hub:
        ends_lost(keyed(hub, key), BOUND)


@pytest.mark.parametrize("how", ["cancel", "timeout", "status"])
def test_tampered_own_job_never_unpickles(queue: str, marker: Path, how: str) -> None:
    """The writer overwrites the caller's own queued job (meta, result, data, status
    fields); the caller then cancels it, times it out, or asks its status."""
    with _caller(queue, marker, **({"delivery_timeout": 2.0} if how == "timeout" else {})) as hub:
        future = hub.submit(tasks.add, 1, 2)
        with redis_client() as client:
            for _ in range(200):
                ids = [k.decode().split(":", 2)[2] for k in client.scan_iter("rq:job:*")
                       if client.hget(k, "origin") == queue.encode()]
                if ids:
                    break
                time.sleep(0.05)
            assert ids, "the caller's job never reached Redis"
            _plant(ids[0], queue, marker, status="queued")

        def status() -> None:
            adapter = hub.dispatcher("rq").transport.adapter
            for _ in range(3):  # the states the caller reads, besides reconciliation's own
                states = shared_loop.run_sync(adapter.status_many([ids[0]]))
                assert states[ids[0]] is not JobState.SUCCEEDED
                assert shared_loop.run_sync(adapter.outcomes([ids[0]])) == {}

        tampered_ends(how, hub, future, BOUND, status)


def test_planted_outcome_field_is_verified_before_anything_is_unpickled(
    queue: str, marker: Path
) -> None:
    """The outcome field the caller does read, holding a base64 pickle: refused by the
    signature check (core.codec.decode_outcome), never unpickled."""
    key = new_key()
    _plant(key, queue, marker, status="finished", wove_outcome=bomb_b64(marker))
    with _caller(queue, marker) as hub:
        future = keyed(hub, key)
        ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
        assert isinstance(ended, Exception) and "signed" in str(ended), repr(ended)
