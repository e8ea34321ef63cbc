"""``WorkerSettings`` of the ``arq`` workers the fault suite starts (``python -m arq
fault_arq_settings.WorkerSettings``, importable through the harness's ``PYTHONPATH``).

A deployment adds one line, the ``functions`` entry; the rest names the test's private
Redis and queue, read from the environment the harness sets.
"""

from __future__ import annotations

import os

from arq.connections import RedisSettings

from wove_adapters.adapters.arq import wove_adapters_run


class WorkerSettings:
    functions = [wove_adapters_run]
    redis_settings = RedisSettings.from_dsn(os.environ["WOVE_FAULTS_ARQ_REDIS_URL"])
    queue_name = os.environ["WOVE_FAULTS_ARQ_QUEUE"]
    allow_abort_jobs = True
    poll_delay = 0.05
    max_jobs = 4
    job_timeout = 60
    health_check_interval = 1
