"""Loss is reported as loss: a drop-box event another client steals ends the run with an
error that says its outcome was lost on the return path (before: an empty
CancelledError for a task that succeeded)."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import DeliveryOrphanedError, Hub
from wove_adapters.testing import tasks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
import shared_servers
from shared_servers import REDIS_URL


def _thief(key: str, stop: threading.Event, stolen: list[bytes]) -> None:
    """Another reader of the drop box. Redis serves blocked readers in order; each thief
    blocks far longer than the caller's reader (which re-arms its BLPOP every second and
    so queues behind them), and a thief that took an event re-arms at the back: with more
    thieves than events in flight, every event goes to a thief."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        while not stop.is_set():
            item = client.blpop([key], timeout=20)
            if item is not None and not stop.is_set():
                stolen.append(item[1])
    except redis.RedisError:
        pass  # the list went away with the caller: nothing left to steal
    finally:
        client.close()


def test_a_stolen_outcome_is_reported_as_lost_on_the_return_path() -> None:
    import redis

    shared_servers.redis_client(suite="security").close()  # fails, saying how to start it
    env: dict[str, Any] = {
        "executor": "process",
        "executor_config": {"return_path": "redis", "return_redis_url": REDIS_URL},
        "delivery_timeout": 60,
    }
    with Hub(environments={"p": env}, default_environment="p") as hub:
        assert hub.run(tasks.add, 1) == 2  # the way back works while nobody steals
        receiver: Any = hub.dispatcher("p").transport.receiver  # type: ignore[attr-defined]
        stop, stolen = threading.Event(), []
        thieves = [threading.Thread(target=_thief, args=(receiver.key, stop, stolen),
                                    daemon=True) for _ in range(8)]
        for thief in thieves:
            thief.start()
        time.sleep(2.5)  # the caller's reader re-arms behind the thief
        started = time.monotonic()
        try:
            future = hub.submit(tasks.add, 41)
            with pytest.raises(DeliveryOrphanedError, match="lost on the return path") as info:
                future.result(timeout=60)
        finally:
            stop.set()  # wake every thief (they are first in line) and wait for them
            waker = redis.Redis.from_url(REDIS_URL)
            try:
                waker.rpush(receiver.key, *([b"wake"] * len(thieves)))
            finally:
                waker.close()
            for thief in thieves:
                thief.join(5)
        assert stolen, "the thief took nothing: the test proved nothing"
        assert "Another client popped it" in str(info.value)
        assert time.monotonic() - started < 30
