"""The broker dies mid-burst and comes back: a private ``redis-server`` (the RQ or Taskiq
queue) is SIGKILLed while runs are queued and running, stays down 3 s and is restarted,
without persistence (the queue comes back empty) and with AOF (it comes back as
acknowledged). Workers may exit when Redis goes away (RQ always does, Taskiq when a call
fails past its retries); the scenario (``faults.broker_kill_and_restart``) replaces each
one that exited, as a supervisor would, and keeps the ones that lived on. Under
``requeue`` + heartbeats every run gives exactly one correct result. ARQ's twin is
``test_broker_faults_arq.py``: arq pins redis<6, so it runs in the ``arq`` tox env.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults
import pytest

# backend -> (its worker fixture, executor_config naming the private Redis and queue)
BACKENDS: dict[str, tuple[str, Callable[[str, str], dict[str, Any]]]] = {
    "rq": ("rq_worker", lambda url, queue: {"redis_url": url, "queue": queue}),
    "taskiq": ("taskiq_worker", lambda url, queue: {"url": url, "queue": queue}),
}


@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof"])
@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_broker_kill_and_restart(backend: str, aof: bool, hub_for: Callable[..., Any],
                                 markers: Path, request: pytest.FixtureRequest,
                                 private_redis: Callable[..., faults.RedisServer]) -> None:
    fixture, executor_config = BACKENDS[backend]
    faults.broker_kill_and_restart(backend, executor_config, request.getfixturevalue(fixture),
                                   hub_for, markers, private_redis(aof=aof))
