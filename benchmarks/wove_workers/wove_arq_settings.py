"""The arq worker of ``bench_wove_arq.py``: the tests' ``BenchWorkerSettings`` (ours,
``wove_adapters_run``, and the native ``native_add``) plus the function wove 2.0.3's arq
adapter enqueues (``wove_run_backend_payload``, which awaits
``wove.integrations.worker.arun(payload)``), all on one worker with the same polls and
slots. ``keep_result=0`` for wove's function: wove never reads arq's result (it gets the
result by HTTP callback), so arq need not store it.
"""

from __future__ import annotations

from typing import Any

from arq.worker import func
from arq_worker_settings import (  # tests/integration/arq on PYTHONPATH
    BenchWorkerSettings,
    settings_running,
)
from wove.integrations.worker import arun


async def wove_run_backend_payload(ctx: dict[str, Any], payload: dict[str, Any]) -> Any:
    return await arun(payload)


WoveBenchSettings = settings_running(
    "WoveBenchSettings", *BenchWorkerSettings.functions,
    func(wove_run_backend_payload, name="wove_run_backend_payload", keep_result=0),
)
