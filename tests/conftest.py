"""Test-wide isolation and plumbing.

- A per-session data dir (ledger, keys, payload store) via WOVE_ADAPTERS_HOME, set before
  any wove_adapters import resolves it; worker subprocesses inherit it.
- Test modules are not importable by worker processes, so functions defined in them are
  pickled by value.
"""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

if "WOVE_ADAPTERS_HOME" not in os.environ:
    os.environ["WOVE_ADAPTERS_HOME"] = tempfile.mkdtemp(prefix="wove-adapters-test-")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import cloudpickle

    seen: set[str] = set()
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and module.__name__ not in seen:
            seen.add(module.__name__)
            if module.__name__ in sys.modules:
                cloudpickle.register_pickle_by_value(module)
