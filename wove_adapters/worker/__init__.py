"""What runs next to a task, on the worker's side of any backend.

``python -m wove_adapters.worker`` runs one signed payload and exits (``__main__``).
Exit codes: 0 succeeded, 1 the task raised, 2 payload refused, 3 outcome undeliverable,
64 started wrongly (no payload: not argparse's 2, which would read as a refusal),
143 cancelled (SIGTERM). See ``wove_adapters.worker.runner`` for the details, and
``wove_adapters.worker.sender`` for the batched, signed way back to the caller.

``wove_adapters.worker.pool``: the one warm process pool every backend that isolates
payloads from its worker's event loop uses (taskiq, arq ``isolation="process"``,
temporal). Importing the pool does not import the runner (a caller-side adapter module
imports the pool's names), so the runner's names here are read on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Outcome", "arun", "main", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from wove_adapters.worker import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
