"""A test module that needs an optional library fails, at collection, saying how to
install it; it is never skipped (a skip would hide a suite CI is meant to run: the tox
envs that run these files install the extras)."""

from __future__ import annotations

import importlib

import pytest


def need(module: str, install: str) -> None:
    """Import ``module`` or fail this test module with ``install`` (what to run)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        pytest.fail(f"{module} is not installed ({exc}); {install}", pytrace=False)
