"""``python -m wove_adapters.worker``: run one signed payload and exit.

Exit codes: 0 succeeded, 1 the task raised, 2 payload refused, 3 outcome undeliverable,
143 cancelled (SIGTERM). See ``wove_adapters.callbacks.worker`` for the details.
"""

from __future__ import annotations

import sys

from wove_adapters.callbacks.worker import Outcome, arun, main, run

__all__ = ["Outcome", "arun", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
