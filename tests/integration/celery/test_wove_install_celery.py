"""``"executor": "celery"`` in a real wove 2.x ``wove_config.py``, through ``install()``,
against a real Celery worker. Without install(), wove 2.0.3 builds its own Celery adapter,
whose task our worker does not know: the weave used to hang in silence."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("wove", reason="the wove extra is part of `dev`; install it")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))

from celery_services import CeleryService
from wove_install import assert_ran_on_ours, run_user_program


def test_plain_celery_name_runs_on_ours(redis_celery: CeleryService, tmp_path: Path) -> None:
    result = run_user_program(tmp_path, "celery", redis_celery.executor_config)
    assert_ran_on_ours(result)
