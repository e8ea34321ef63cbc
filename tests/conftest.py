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
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

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


@pytest.fixture
def caller_only_module(tmp_path: Path) -> Iterator[ModuleType]:
    """A module importable in this process only (its directory is on this sys.path), so
    cloudpickle ships its functions by reference and a worker cannot import it: the
    worker-side import error every backend's error tests provoke."""
    name = f"wove_caller_only_{uuid.uuid4().hex[:8]}"
    directory = tmp_path / "caller-only"
    directory.mkdir()
    (directory / f"{name}.py").write_text("def task(x):\n    return x + 1\n")
    sys.path.insert(0, str(directory))
    try:
        yield __import__(name)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(name, None)


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    """Where a task writes its marker files (world-writable: any worker process may run
    it, as any user)."""
    path = tmp_path / "markers"
    path.mkdir()
    os.chmod(path, 0o777)
    return path
