"""The reference adapter passes the conformance suite: one OS process per task."""

from __future__ import annotations

from typing import Any

import pytest

from wove_adapters.testing import AdapterConformance


class TestProcessConformance(AdapterConformance):
    detection_timeout = 20.0

    @pytest.fixture
    def environment(self) -> dict[str, Any]:
        return {"executor": "process", "executor_config": {}}

    @pytest.fixture
    def worker_slots(self) -> int:
        return 0

    def refusing_environment(self, environment: dict[str, Any]) -> dict[str, Any]:
        # process hands executor_config.secret to its workers: hand them another key.
        definition = super().refusing_environment(environment)
        definition["executor_config"]["env"] = {"WOVE_ADAPTERS_SECRET": "not-the-caller-key"}
        return definition
