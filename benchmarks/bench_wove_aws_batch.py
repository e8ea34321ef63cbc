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

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "aws_batch"))

from common import bench_arguments, emit, wove_attempt, wove_attempt_record  # noqa: E402


def main() -> None:
    bench_arguments(__doc__.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-aws-"))
    import aws_batch_services as services

    stack = services.start_stack(Path(tempfile.mkdtemp(prefix="bench-wove-aws-")))
    try:
        failure = wove_attempt("aws_batch", {
            "client": stack.client("batch"),
            "job_queue": stack.names["queue"],
            "job_definition": stack.names["definition"],
            "command": [sys.executable, "-m", "wove.backend_worker"],
        }, timeout=60)
    finally:
        services.stop_stack(stack)
    emit(wove_attempt_record("aws_batch", "aws_batch", failure))


if __name__ == "__main__":
    main()
