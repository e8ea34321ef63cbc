"""A Redis writer cannot run code in a ``taskiq`` caller (issue 13, item 1).

taskiq-redis result backends pickle results by default. A Redis writer plants pickles
that create a marker file when unpickled (``broker_planting.Bomb``) in every key the
caller might read (the task's result, our claim, state and outcome keys), under the
handle an idempotency key's claim names or over the caller's own queued job. The caller
then submits, follows, reads status, cancels and times out: the marker must never
appear, and each run ends with a clear error or as lost, in bounded time. No worker
reads these queues. Run with the taskiq tox env.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "taskiq"))
from broker_planting import bomb, bomb_b64, caller, keyed, new_key
from run_ends import cancel_ends, ends_lost, ends_within
from services import scratch_queue
from taskiq_fixtures import REDIS_URL, cleanup_keys, redis_client, require_redis

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError, DeliveryTimeoutError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub

BOUND = 30.0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue no worker reads."""
    yield from scratch_queue("wove-sec-taskiq", require_redis, cleanup_keys)


def _caller(queue: str, marker: Path, **policy: Any) -> contextlib.AbstractContextManager[Hub]:
    return caller(marker, "taskiq", {"url": REDIS_URL, "queue": queue}, BOUND, **policy)


def _plant(queue: str, handle: str, marker: Path, **ours: bytes | str | None) -> None:
    """The task's result (a pickle, as taskiq-redis writes by default) and our keys."""
    with redis_client() as client:
        client.set(handle, bomb(marker), ex=600)
        for kind, value in ours.items():
            if value is not None:
                client.set(f"wove:taskiq:{queue}:{kind}:{handle}", value, ex=600)


@pytest.mark.parametrize("planted", ["forged-outcome", "result-only", "garbage-claim"])
def test_following_a_planted_claim_never_unpickles(
    queue: str, marker: Path, planted: str
) -> None:
    key, held = new_key(), f"held{new_key()}"
    claim: bytes | str = json.dumps({"run": "someone-else", "handle": held})
    if planted == "garbage-claim":
        claim = bomb(marker)
    _plant(queue, key, marker, claim=claim)  # claim:<key> names the job to follow
    if planted == "forged-outcome":
        _plant(queue, held, marker, state="succeeded", outcome=bomb_b64(marker))
    else:  # the task has a result (a pickle) and none of our state: ended, unknown how
        _plant(queue, held, marker)
    with _caller(queue, marker) as hub:
        future = keyed(hub, key)
        ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
        assert isinstance(ended, Exception), repr(ended)
        if planted == "result-only":
            assert isinstance(ended, DeliveryOrphanedError), repr(ended)
        if planted == "garbage-claim":
            assert "not one wove-adapters wrote" in str(ended), repr(ended)


@pytest.mark.parametrize("how", ["cancel", "timeout", "status"])
def test_tampered_own_job_never_unpickles(queue: str, marker: Path, how: str) -> None:
    """The writer plants a pickled result for the caller's own queued job (and leaves
    our state key unset); the caller cancels it, times it out, or reads its status."""
    key = new_key()
    with _caller(queue, marker, **({"delivery_timeout": 3.0} if how == "timeout" else {})) as hub:
        if how == "timeout":  # reconciliation would find it ended first: plant later
            future = keyed(hub, key)
            ended = ends_within(BOUND, lambda: future.result(timeout=BOUND))
            _plant(queue, key, marker)
            assert isinstance(ended, DeliveryTimeoutError), repr(ended)
            return
        future = keyed(hub, key)
        time.sleep(0.3)
        _plant(queue, key, marker)
        if how == "cancel":
            cancel_ends(hub, future, BOUND)
        else:
            adapter = hub.dispatcher("taskiq").transport.adapter
            states = shared_loop.run_sync(adapter.status_many([key]))
            assert states[key] is JobState.FAILED, states
            ends_lost(future, BOUND)
