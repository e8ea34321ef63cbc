"""``WorkerSettings`` for the ``arq`` CLI workers the tests start (``arq
arq_worker_settings.WorkerSettings``, run from this directory).

The only wove-adapters line a real deployment needs is the ``functions`` entry; the rest
reads the per-session queue and Redis from the environment the fixture sets.
"""

from __future__ import annotations

import os
from typing import Any

from arq.connections import RedisSettings

from wove_adapters.adapters.arq import wove_adapters_run


class WorkerSettings:
    functions = [wove_adapters_run]  # the one line an existing deployment adds
    redis_settings = RedisSettings.from_dsn(os.environ["WOVE_TEST_ARQ_REDIS_URL"])
    queue_name = os.environ["WOVE_TEST_ARQ_QUEUE"]
    allow_abort_jobs = True
    poll_delay = float(os.environ.get("WOVE_TEST_ARQ_POLL_DELAY", "0.01"))
    max_jobs = int(os.environ.get("WOVE_TEST_ARQ_MAX_JOBS", "4"))
    job_timeout = float(os.environ.get("WOVE_TEST_ARQ_JOB_TIMEOUT", "120"))
    health_check_interval = 1


class MinimalWorkerSettings:
    """What the docs show: arq's defaults (0.5 s polls, no abort) plus our function."""

    functions = [wove_adapters_run]
    redis_settings = RedisSettings.from_dsn(os.environ["WOVE_TEST_ARQ_REDIS_URL"])
    queue_name = os.environ["WOVE_TEST_ARQ_QUEUE"]


async def native_add(ctx: dict[str, object], x: int) -> int:
    """ARQ's own path, for the benchmark: an async job function, result via Redis."""
    return x + 1


def settings_running(name: str, *functions: Any) -> type:
    """A settings class named ``name`` that runs ``functions`` with ``WorkerSettings``'
    queue, Redis, polls, slots and timeouts. arq reads only a settings class's own
    ``__dict__``, so nothing can be inherited: the class gets its own copy of them."""
    own = {key: value for key, value in vars(WorkerSettings).items()
           if not key.startswith("__")}
    return type(name, (), {**own, "functions": list(functions)})


# benchmarks/bench_arq.py: both paths on one worker, same polls, same slots.
BenchWorkerSettings = settings_running("BenchWorkerSettings", wove_adapters_run, native_add)
