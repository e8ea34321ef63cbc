"""The Celery adapter passes the conformance suite on both brokers, against a real
``celery worker --pool=prefork -c 1`` process (see conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest
from celery_services import CeleryService

from wove_adapters.testing import AdapterConformance


class TestCeleryRedisConformance(AdapterConformance):
    detection_timeout = 30.0
    extra = "celery"
    library = ("celery",)

    @pytest.fixture
    def environment(self, redis_celery: CeleryService) -> dict[str, Any]:
        return {"executor": "celery", "executor_config": redis_celery.executor_config}


class TestCeleryRabbitMQConformance(AdapterConformance):
    detection_timeout = 30.0
    extra = "celery"
    library = ("celery",)

    @pytest.fixture
    def environment(self, amqp_celery: CeleryService) -> dict[str, Any]:
        return {"executor": "celery", "executor_config": amqp_celery.executor_config}
