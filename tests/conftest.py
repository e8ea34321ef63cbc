"""Test-wide isolation: per-session data dir (ledger, keys, payload store)."""

from __future__ import annotations

import os
import tempfile

# Before any wove_adapters import resolves its data dir.
if "WOVE_ADAPTERS_HOME" not in os.environ:
    os.environ["WOVE_ADAPTERS_HOME"] = tempfile.mkdtemp(prefix="wove-adapters-test-")
