"""``python -m wove_adapters.worker``: run one signed payload and exit (see the package)."""

from __future__ import annotations

import sys

from wove_adapters.worker.runner import main

if __name__ == "__main__":
    sys.exit(main())
