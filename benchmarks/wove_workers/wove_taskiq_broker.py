"""The taskiq broker module of ``bench_wove_taskiq.py`` (``taskiq worker
wove_taskiq_broker:broker``): ``bench_taskiq.py``'s broker (ours via ``register(broker)``,
the native ``bench.add``) plus the task wove 2.0.3's taskiq adapter kicks
(``wove.run_backend_payload``, awaiting ``wove.integrations.worker.arun(payload)``).
"""

from __future__ import annotations

import os
from typing import Any

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend
from wove.integrations.worker import arun

from wove_adapters.adapters.taskiq import register

broker = ListQueueBroker(
    os.environ["BENCH_URL"], queue_name=os.environ["BENCH_QUEUE"], socket_timeout=None
).with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_URL"], result_ex_time=600))
register(broker, processes=int(os.environ.get("BENCH_PROCESSES", "2")))


@broker.task(task_name="bench.add")
async def add(x: int) -> int:
    return x + 1


@broker.task(task_name="wove.run_backend_payload")
async def wove_run_backend_payload(payload: dict[str, Any]) -> Any:
    return await arun(payload)
