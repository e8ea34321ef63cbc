"""The Celery app the test workers run: a user's app plus the one-line worker helper.

``celery -A celery_test_app worker`` is started by the fixtures in ``conftest.py`` with
the broker, result backend and Celery settings in ``WOVE_TEST_CELERY_*`` variables.
"""

from __future__ import annotations

import json
import os

from celery import Celery

from wove_adapters.adapters.celery import BASE_CONF, register

app = Celery(
    "wove-test",
    broker=os.environ["WOVE_TEST_CELERY_BROKER"],
    backend=os.environ["WOVE_TEST_CELERY_BACKEND"],
)
app.conf.update(BASE_CONF)
app.conf.update(json.loads(os.environ.get("WOVE_TEST_CELERY_CONFIG") or "{}"))
register(app, **json.loads(os.environ.get("WOVE_TEST_CELERY_REGISTER") or "{}"))


@app.task(name="wove_test.add")
def add(x: int, y: int = 1) -> int:
    """A plain Celery task, for the native side of comparisons."""
    return x + y
