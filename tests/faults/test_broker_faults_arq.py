"""ARQ's broker-kill scenario (``faults.broker_kill_and_restart``, see
``test_broker_faults.py``): the private Redis holding ARQ's queue is SIGKILLed mid-burst
and restarted, without persistence and with AOF. It runs in the ``arq`` tox env, not
``faults``: arq pins redis<6, which Celery's kombu and taskiq-redis refuse.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import faults
import pytest


@pytest.mark.parametrize("aof", [False, True], ids=["no-persistence", "aof"])
def test_arq_broker_kill_and_restart(aof: bool, hub_for: Callable[..., Any], markers: Path,
                                     private_redis: Callable[..., faults.RedisServer],
                                     arq_worker: Callable[..., faults.ArqWorkerProcess]
                                     ) -> None:
    faults.broker_kill_and_restart(
        "arq", lambda url, queue: {"redis_url": url, "queue_name": queue}, arq_worker,
        hub_for, markers, private_redis(aof=aof))
