"""AWS Batch: can wove 2.0.3's aws_batch adapter run a task at all, against the tests'
stack (moto in server mode + the Docker Engine API shim, where every job is a real local
process: ``tests/integration/aws_batch/aws_batch_services.py``)?

wove's adapter submits a job named ``wove-<run id>`` with the payload in the
``WOVE_BACKEND_PAYLOAD`` environment variable and ``python -m wove.backend_worker`` as
the command; its run id is ``<task>:<hex>``, and AWS Batch job names allow only letters,
digits, ``-`` and ``_``. This script sends one task through wove's adapter (same queue
and job definition as ours) and prints one JSON line with the outcome.

    python benchmarks/bench_wove_aws_batch.py
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import attempt_once  # the harness, beside this script

TESTS = Path(__file__).resolve().parents[1] / "tests" / "integration"
sys.path.insert(0, str(TESTS / "aws_batch"))


@contextlib.contextmanager
def moto_stack(workdir: Path) -> Iterator[dict[str, Any]]:
    """The tests' moto + Docker Engine API shim stack; wove's config for its queue."""
    import aws_batch_services as services

    stack = services.start_stack(workdir)
    try:
        yield {
            "client": stack.client("batch"),
            "job_queue": stack.names["queue"],
            "job_definition": stack.names["definition"],
            "command": [sys.executable, "-m", "wove.backend_worker"],
        }
    finally:
        services.stop_stack(stack)


if __name__ == "__main__":
    attempt_once("aws_batch", __doc__, moto_stack)
