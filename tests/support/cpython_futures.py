"""CPython's own ``test_concurrent_futures``, pointed at ``hub.executor(...)``.

This interpreter (pyenv 3.11) ships ``test.support`` but not the concurrent.futures tests;
Debian's ``libpython3.11-testsuite`` installs them as a plain file. We load that file by
path under its own module name, with this interpreter's ``test.support``, and register it
with cloudpickle by value: stdio and process workers receive its task functions
(``mul``, ``sleep_and_raise``, the pickling bombs) without having to import it.

The executor "types" below are factories named like executor classes, because CPython's
interpreter-shutdown tests spawn a child interpreter whose code imports the executor type
by name (``from concurrent.futures import {executor_type}``); ``assert_python_ok`` below
points that import (and ``sleep_and_print``'s) at this module, so the child runs the Hub.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from wove_adapters import Hub
from wove_adapters.integration.hub import HubExecutor

MODULE_NAME = "cpython_test_concurrent_futures"
ENVIRONMENT = "cpython-futures"
_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
CPYTHON_FILE = Path(
    os.environ.get(
        "WOVE_TEST_CPYTHON_FUTURES", f"/usr/lib/python{_VERSION}/test/test_concurrent_futures.py"
    )
)
INSTALL_LINE = f"apt-get install -y libpython{_VERSION}-testsuite"
MISSING = (
    f"CPython's concurrent.futures tests are not installed ({CPYTHON_FILE} is missing). "
    f"Install them with: {INSTALL_LINE} (Debian/Ubuntu), or point WOVE_TEST_CPYTHON_FUTURES "
    f"at a test_concurrent_futures.py from CPython {_VERSION}."
)
_TESTS_DIR = Path(__file__).resolve().parents[1]


def load() -> ModuleType | None:
    """CPython's test module, or None when the file is not installed."""
    found = sys.modules.get(MODULE_NAME)
    if found is not None:
        return found
    if not CPYTHON_FILE.is_file():
        return None
    import cloudpickle

    spec = importlib.util.spec_from_file_location(MODULE_NAME, CPYTHON_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(MODULE_NAME, None)
        raise
    cloudpickle.register_pickle_by_value(module)
    # Its child-interpreter tests import the executor type and sleep_and_print by name.
    module.assert_python_ok = assert_python_ok  # type: ignore[attr-defined]
    return module


def _hub_executor(
    executor: str, max_workers: int | None = None, mp_context: Any = None, **kwargs: Any
) -> HubExecutor:
    """``hub.executor(..., max_workers=N)`` over a started environment sized like a pool.

    The Hub executor hands at most ``max_workers`` calls to the backend at once; the
    transport gets as many workers (``local``: threads, ``stdio``: processes; ``process``
    starts one OS process per call anyway). The environment is started here, as a pool
    starts its workers.
    """
    if mp_context is not None or kwargs:
        raise TypeError(
            f"a Hub executor takes no multiprocessing context or {sorted(kwargs)}; "
            "this test does not apply to it"
        )
    definition: dict[str, Any] = {"executor": executor, "executor_config": {}}
    if max_workers is not None and max_workers > 0:
        if executor == "local":
            definition["executor_config"]["max_workers"] = max_workers
        elif executor == "stdio":
            definition["executor_config"]["processes"] = max_workers
    hub = Hub(environments={ENVIRONMENT: definition}, default_environment=ENVIRONMENT)
    pool = hub.executor(ENVIRONMENT, max_workers=max_workers)
    hub.dispatcher(ENVIRONMENT)
    return pool


def _factory(executor: str, name: str) -> Callable[..., HubExecutor]:
    def factory(max_workers: int | None = None, *args: Any, **kwargs: Any) -> HubExecutor:
        return _hub_executor(executor, max_workers, *args, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"A Hub executor over the '{executor}' executor (named like a pool class)."
    return factory


LocalHubExecutor = _factory("local", "LocalHubExecutor")
StdioHubExecutor = _factory("stdio", "StdioHubExecutor")
ProcessHubExecutor = _factory("process", "ProcessHubExecutor")


def __getattr__(name: str) -> Any:
    """``from support.cpython_futures import sleep_and_print`` in the child interpreter."""
    module = load()
    if module is None:
        raise AttributeError(f"{name}: {MISSING}")
    return getattr(module, name)


def assert_python_ok(*args: str, **env_vars: Any) -> Any:
    """CPython's ``assert_python_ok`` with the child's imports pointed at this module.

    Only the two import lines change; the child code and the assertions are CPython's.
    The child is not isolated (``-I`` would drop PYTHONPATH): it needs this directory.
    """
    from test.support import script_helper

    rewritten = list(args)
    code = rewritten[-1]
    replacements = {
        "from concurrent.futures import ": "from support.cpython_futures import ",
        "from test.test_concurrent_futures import ": "from support.cpython_futures import ",
    }
    for old, new in replacements.items():
        code = code.replace(old, new)
    if "support.cpython_futures" not in code:
        raise AssertionError(f"CPython's child code changed; nothing to point at the Hub:\n{code}")
    rewritten[-1] = code
    path = os.pathsep.join(p for p in (str(_TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    env_vars.setdefault("PYTHONPATH", path)
    return script_helper.assert_python_ok(*rewritten, **env_vars)
