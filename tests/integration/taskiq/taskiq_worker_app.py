"""The broker module the tests hand to the real ``taskiq worker`` CLI.

It is what a user's own broker module looks like: a taskiq-redis broker plus one line,
``register(broker)``. The queue and Redis URL come from the environment so each test
session gets its own queue.
"""

from __future__ import annotations

import os

from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend, RedisStreamBroker

from wove_adapters.adapters.taskiq import register

URL = os.environ.get("WOVE_TEST_TASKIQ_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("WOVE_TEST_TASKIQ_QUEUE", "wove_adapters")

backend = RedisAsyncResultBackend(URL, result_ex_time=3600)
if os.environ.get("WOVE_TEST_TASKIQ_BROKER") == "stream":
    broker = RedisStreamBroker(URL, queue_name=QUEUE).with_result_backend(backend)
else:
    # Deliberately without socket_timeout=None (the docs recommend it): register() must
    # lift redis-py 8's 5 s read timeout itself, or this idle worker would die every 5 s.
    broker = ListQueueBroker(URL, queue_name=QUEUE).with_result_backend(backend)
register(broker, processes=int(os.environ.get("WOVE_TEST_TASKIQ_PROCESSES", "2")))
