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

import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "taskiq"))
from broker_planting import assert_not_unpickled, bomb, bomb_b64, marker
from run_ends import cancel_ends, ends_lost, ends_within
from taskiq_fixtures import REDIS_URL, cleanup_keys, redis_client, require_redis

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError, DeliveryTimeoutError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks

__all__ = ["marker"]  # the fixture

BOUND = 30.0


@pytest.fixture
def queue() -> Iterator[str]:
    """A queue no worker reads."""
    require_redis()
    name = f"wove-sec-taskiq-{uuid.uuid4().hex[:8]}"
    yield name
    cleanup_keys(name)


def _hub(queue: str, **policy: Any) -> Hub:
    definition = {"executor": "taskiq", "executor_config": {"url": REDIS_URL, "queue": queue},
                  "delivery_orphan_policy": "fail", "delivery_timeout": BOUND, **policy}
    return Hub(environments={"taskiq": definition}, default_environment="taskiq")


def _plant(queue: str, handle: str, marker: Path, **ours: bytes | str | None) -> None:
    """The task's result (a pickle, as taskiq-redis writes by default) and our keys."""
    client = redis_client()
    try:
        client.set(handle, bomb(marker), ex=600)
        for kind, value in ours.items():
            if value is not None:
                client.set(f"wove:taskiq:{queue}:{kind}:{handle}", value, ex=600)
    finally:
        client.close()


def _keyed(hub: Hub, key: str) -> Any:
    return hub.submit(tasks.add, 1, 2, task_options={"delivery_idempotency_key": key})


@pytest.mark.parametrize("planted", ["forged-outcome", "result-only", "garbage-claim"])
def test_following_a_planted_claim_never_unpickles(
    queue: str, marker: Path, planted: str
) -> None:
    key, held = f"sec{uuid.uuid4().hex[:8]}", f"held{uuid.uuid4().hex[:8]}"
    claim: bytes | str = json.dumps({"run": "someone-else", "handle": held})
    if planted == "garbage-claim":
        claim = bomb(marker)
    _plant(queue, key, marker, claim=claim)  # claim:<key> names the job to follow
    if planted == "forged-outcome":
        _plant(queue, held, marker, state="succeeded", outcome=bomb_b64(marker))
    else:  # the task has a result (a pickle) and none of our state: ended, unknown how
        _plant(queue, held, marker)
    hub = _hub(queue)
    try:
        future = _keyed(hub, key)
        ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
        assert isinstance(ended, Exception), repr(ended)
        if planted == "result-only":
            assert isinstance(ended, DeliveryOrphanedError), repr(ended)
        if planted == "garbage-claim":
            assert "not one wove-adapters wrote" in str(ended), repr(ended)
    finally:
        hub.close()
    assert_not_unpickled(marker)


@pytest.mark.parametrize("how", ["cancel", "timeout", "status"])
def test_tampered_own_job_never_unpickles(queue: str, marker: Path, how: str) -> None:
    """The writer plants a pickled result for the caller's own queued job (and leaves
    our state key unset); the caller cancels it, times it out, or reads its status."""
    key = f"sec{uuid.uuid4().hex[:8]}"
    hub = _hub(queue, **({"delivery_timeout": 3.0} if how == "timeout" else {}))
    try:
        if how == "timeout":  # reconciliation would find it ended first: plant later
            future = _keyed(hub, key)
            ended = ends_within(BOUND, lambda: future.result(timeout=BOUND))
            _plant(queue, key, marker)
            assert isinstance(ended, DeliveryTimeoutError), repr(ended)
            return
        future = _keyed(hub, key)
        time.sleep(0.3)
        _plant(queue, key, marker)
        if how == "cancel":
            cancel_ends(hub, future, BOUND)
        else:
            adapter = hub.dispatcher("taskiq").transport.adapter
            states = shared_loop.run_sync(adapter.status_many([key]))
            assert states[key] is JobState.FAILED, states
            ends_lost(future, BOUND)
    finally:
        hub.close()
        assert_not_unpickled(marker)
