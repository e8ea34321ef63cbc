"""Prometheus metrics of runs through a real Celery worker (Redis broker): every metric
matches the runs made (tests/support/metric_runs.py), and a forged event posted to the
receiver is counted as a rejection."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from wove_adapters import Hub

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from celery_services import CeleryService
from extras import need
from metric_runs import own_registry, run_mix_and_check

need("prometheus_client", "pip install -e '.[metrics]' (tox installs it in this file's env)")
registry = pytest.fixture(own_registry, name="registry")


def test_metric_values_match_the_runs_made(
    traced_celery: tuple[CeleryService, Path], registry: Any, tmp_path: Path
) -> None:
    service, _ = traced_celery
    definition = {"executor": "celery", "executor_config": service.executor_config}
    with Hub(environments={"celery-metrics": definition},
             default_environment="celery-metrics") as hub:
        run_mix_and_check(hub, registry, "celery-metrics", "celery", receiver=True,
                          sleepy_dir=str(tmp_path))
