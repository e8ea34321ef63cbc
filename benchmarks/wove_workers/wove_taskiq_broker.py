"""The taskiq broker module of ``bench_wove_taskiq.py`` (``taskiq worker
wove_taskiq_broker:broker``): ``bench_taskiq.py``'s broker (ours via ``register(broker)``,
the native ``bench.add``) plus the task wove 2.0.3's taskiq adapter kicks
(``wove.run_backend_payload``, awaiting ``wove.integrations.worker.arun(payload)``).
"""

from __future__ import annotations

from typing import Any

from taskiq_bench_broker import add, broker  # benchmarks/, on the worker's PYTHONPATH
from wove.integrations.worker import arun

__all__ = ["add", "broker"]  # the worker's broker, and the native task it knows


@broker.task(task_name="wove.run_backend_payload")
async def wove_run_backend_payload(payload: dict[str, Any]) -> Any:
    return await arun(payload)
