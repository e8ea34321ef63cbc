"""Where this package keeps per-user state: the default ledger, payload store and keys.

``WOVE_ADAPTERS_HOME`` overrides the location (tests and CI point it at a temp dir);
otherwise it is the platform's user data directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    override = os.environ.get("WOVE_ADAPTERS_HOME")
    path = _FOUND.get(override)
    if path is None:  # once per process: every run's payload names the store here
        if override:
            path = Path(override)
        else:
            import platformdirs

            path = Path(platformdirs.user_data_dir("wove-adapters", appauthor=False))
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        _FOUND[override] = path
    return path


_FOUND: dict[str | None, Path] = {}  # made, by WOVE_ADAPTERS_HOME (tests change it)


def default_ledger_url() -> str:
    return f"sqlite:///{data_dir() / 'runs.db'}"


def default_store_url() -> str:
    # Every run's envelope names it: made once per WOVE_ADAPTERS_HOME, like data_dir.
    override = os.environ.get("WOVE_ADAPTERS_HOME")
    url = _STORE_URLS.get(override)
    if url is None:
        url = _STORE_URLS[override] = f"file://{data_dir() / 'payloads'}"
    return url


_STORE_URLS: dict[str | None, str] = {}
