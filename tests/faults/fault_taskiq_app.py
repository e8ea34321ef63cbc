"""The broker module of the ``taskiq worker`` processes the fault suite starts
(``python -m taskiq worker fault_taskiq_app:broker``, importable through the harness's
``PYTHONPATH``): a taskiq-redis list broker on the test's private Redis, plus the one
line a deployment adds, ``register(broker)``.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from wove_adapters.adapters.taskiq import register

URL = os.environ["WOVE_FAULTS_TASKIQ_URL"]
QUEUE = os.environ["WOVE_FAULTS_TASKIQ_QUEUE"]

broker = ListQueueBroker(URL, queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(URL, result_ex_time=3600))
register(broker, processes=4)
