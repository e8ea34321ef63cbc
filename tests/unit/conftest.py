"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def isolated_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No stray WOVE__* variable or wove_config file may leak into a configuration test:
    the variables go, and the working directory (where a config file is looked for) is
    this test's own."""
    for name in list(os.environ):
        if name.upper().startswith("WOVE__") or name == "WOVE_CONFIG_FILE":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
