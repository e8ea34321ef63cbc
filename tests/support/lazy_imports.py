"""Importing an adapter module must not import its backend's library.

A caller that only names an executor in its config pays for the backend's library when
the first job goes there, not at import (and a process without the extra can still
import every adapter module). Checked in a fresh interpreter: this one already holds the
libraries other tests imported.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence


def assert_imports_without(module: str, libraries: Sequence[str], check: str = "") -> None:
    """``import module as m`` in a fresh interpreter leaves every one of ``libraries``
    unimported; ``check`` (Python, about ``m``) must hold there too."""
    code = (
        f"import sys, {module} as m; "
        f"loaded = [name for name in {list(libraries)!r} if name in sys.modules]; "
        "assert not loaded, loaded; "
        f"{check}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def blocked(*modules: str) -> str:
    """Python source that, run first in a fresh interpreter, makes importing any of
    ``modules`` (or their submodules) fail as if they were not installed."""
    return (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {list(modules)!r}:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
