"""The taskiq broker module of ``bench_taskiq.py`` (``taskiq worker
taskiq_bench_broker:broker``): ours via ``register(broker)`` and the native ``bench.add``,
on the queue and Redis the benchmark names in ``BENCH_URL`` / ``BENCH_QUEUE``.
``wove_workers/wove_taskiq_broker.py`` imports it and adds wove's task.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from wove_adapters.adapters.taskiq import register

broker = ListQueueBroker(
    os.environ["BENCH_URL"], queue_name=os.environ["BENCH_QUEUE"], socket_timeout=None
).with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_URL"], result_ex_time=600))
register(broker, processes=int(os.environ.get("BENCH_PROCESSES", "2")))


@broker.task(task_name="bench.add")
async def add(x: int) -> int:
    return x + 1
