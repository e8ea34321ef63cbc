"""A result-backend or broker writer cannot run code in a ``celery`` caller (issue 13,
item 1).

Celery decodes task metas with the result backend's serializer; a caller whose app
accepts pickle (``result_serializer``/``result_accept_content``) would unpickle whatever a
Redis writer planted. The writer plants pickles that create a marker file when unpickled
(``broker_planting.Bomb``) as the task meta of the job a key's claim names, as the claim
itself, and over the caller's own queued task. The caller (with Celery's JSON defaults,
and with an app that accepts pickle) submits, follows, reads status, cancels and times
out: the marker must never appear, and each run ends with a clear error or as lost, in
bounded time. No worker consumes these queues. Run with the celery tox env.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration" / "celery"))
from broker_planting import bomb, bomb_b64, caller, keyed, new_key
from celery_services import REDIS_URL, require_service
from run_ends import ends_within, tampered_ends

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryTimeoutError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub

BOUND = 20.0
PICKLE_CALLER = {"result_serializer": "pickle", "result_accept_content": ["pickle", "json"],
                 "accept_content": ["pickle", "json"]}


@pytest.fixture
def planted() -> Iterator[list[str]]:
    """Keys this test planted, deleted afterwards (Redis is shared)."""
    require_service("redis", REDIS_URL)
    keys: list[str] = []
    yield keys
    client = _client()
    try:
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _client() -> Any:
    import redis

    return redis.Redis.from_url(REDIS_URL)


def _plant(keys: list[str], key: str, value: bytes | str) -> None:
    keys.append(key)
    client = _client()
    try:
        client.set(key, value, ex=600)
    finally:
        client.close()


def _caller(
    accepts: str, marker: Path, planted: list[str], **policy: Any
) -> contextlib.AbstractContextManager[Hub]:
    """A caller whose app accepts ``accepts`` ("json": Celery's defaults, or "pickle"). Its
    queue has no worker: the message left in it is deleted with the planted keys."""
    queue = f"wove-sec-celery-{uuid.uuid4().hex[:8]}"
    # kombu's queue and its binding sets (the exchange of the same name).
    planted.extend([queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}"])
    config = {"broker_url": REDIS_URL, "result_backend": REDIS_URL,
              "queue": queue,
              "celery_config": PICKLE_CALLER if accepts == "pickle" else {}}
    return caller(marker, "celery", config, BOUND, **policy)


@pytest.mark.parametrize("accepts", ["json", "pickle"])
@pytest.mark.parametrize("what", ["pickled-meta", "forged-outcome", "garbage-claim"])
def test_following_a_planted_claim_never_unpickles(
    planted: list[str], marker: Path, accepts: str, what: str
) -> None:
    key, held = new_key(), f"held{new_key()}"
    claim: bytes | str = json.dumps({"run": "someone-else", "handle": held})
    _plant(planted, f"celery-task-meta-{key}:wove-claim",
           bomb(marker) if what == "garbage-claim" else claim)
    meta: bytes | str = bomb(marker)
    if what == "forged-outcome":
        meta = json.dumps({"status": "SUCCESS", "task_id": held,
                           "result": {"state": "succeeded", "outcome": bomb_b64(marker)}})
    _plant(planted, f"celery-task-meta-{held}", meta)
    policy = {"delivery_timeout": 5.0} if what == "pickled-meta" else {}
    with _caller(accepts, marker, planted, **policy) as hub:
        future = keyed(hub, key)
        ended = ends_within(BOUND, lambda: future.result(timeout=BOUND + 5))
        assert isinstance(ended, Exception), repr(ended)
        if what == "pickled-meta":  # an unreadable meta is no verdict: the timeout ends it
            assert isinstance(ended, DeliveryTimeoutError), repr(ended)
        if what == "garbage-claim":
            assert "not one wove-adapters wrote" in str(ended), repr(ended)


@pytest.mark.parametrize("how", ["cancel", "timeout", "status"])
def test_tampered_own_task_never_unpickles(planted: list[str], marker: Path, how: str) -> None:
    """The writer plants a pickled meta over the caller's own queued task (an app that
    accepts pickle); the caller then cancels it, times it out, or reads its status."""
    key = new_key()
    planted += [f"celery-task-meta-{key}:wove-claim"]
    policy = {"delivery_timeout": 3.0} if how == "timeout" else {}
    with _caller("pickle", marker, planted, **policy) as hub:
        future = keyed(hub, key)
        _plant(planted, f"celery-task-meta-{key}", bomb(marker))

        def status() -> None:
            adapter = hub.dispatcher("celery").transport.adapter
            for _ in range(3):
                state = shared_loop.run_sync(adapter.status(key))
                assert state is JobState.UNKNOWN, state
            assert shared_loop.run_sync(adapter.outcomes([key])) == {}

        tampered_ends(how, hub, future, BOUND, status)
