"""The Celery worker app of ``bench_wove_celery.py``: the tests' worker app (our
``register(app)`` plus the native ``wove_test.add``) with wove 2.0.3's worker task added,
so one worker process pool serves all three sides.

wove's Celery adapter sends ``wove.run_backend_payload`` with the payload dict; the
worker side wove expects is a task of that name calling
``wove.integrations.worker.run(payload)``, which runs the callable and POSTs the result
to the caller's callback server. ``ignore_result``: wove never reads Celery's result.
"""

from __future__ import annotations

from celery_test_app import app
from wove.integrations.worker import run as wove_run

app.task(name="wove.run_backend_payload", ignore_result=True)(wove_run)
