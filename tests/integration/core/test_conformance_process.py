"""The reference adapter passes the conformance suite: one OS process per task."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance


class TestProcessConformance(BackendConformance):
    executor = "process"
    slots = 0

    def refusing_environment(self, environment: dict[str, Any]) -> dict[str, Any]:
        # process hands executor_config.secret to its workers: hand them another key.
        definition = super().refusing_environment(environment)
        definition["executor_config"]["env"] = {"WOVE_ADAPTERS_SECRET": "not-the-caller-key"}
        return definition
