"""The Celery adapter passes the conformance suite on both brokers, against a real
``celery worker --pool=prefork -c 1`` process (see conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from celery_services import CeleryService


class TestCeleryRedisConformance(BackendConformance):
    executor = "celery"
    service = "redis_celery"

    def executor_config(self, service: CeleryService) -> dict[str, Any]:
        return service.executor_config


class TestCeleryRabbitMQConformance(TestCeleryRedisConformance):
    service = "amqp_celery"
