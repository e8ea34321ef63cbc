"""The broker module the tests hand to the real ``taskiq worker`` CLI.

It is what a user's own broker module looks like: a taskiq-redis broker plus one line,
``register(broker)``. The queue and Redis URL come from the environment so each test
session gets its own queue.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

from wove_adapters.adapters.taskiq import register

URL = os.environ.get("WOVE_TEST_TASKIQ_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("WOVE_TEST_TASKIQ_QUEUE", "wove_adapters")

# socket_timeout=None: redis-py 8 would time out the idle BRPOP (taskiq-redis #127).
broker = ListQueueBroker(URL, queue_name=QUEUE, socket_timeout=None).with_result_backend(
    RedisAsyncResultBackend(URL, result_ex_time=3600)
)
register(broker, processes=int(os.environ.get("WOVE_TEST_TASKIQ_PROCESSES", "2")))
