"""``moto_server`` with one fidelity fix for AWS Batch: DescribeJobs reports a stopped
job's container exit code, as AWS Batch does (``container.exitCode``, and the same in
the job's last attempt); moto 5 keeps it only in ListJobs. The aws_batch adapter reads it
to tell a payload the worker refused (exit code 2) from a task that failed (1).

Run as ``python moto_batch_server.py [moto_server arguments]`` (``aws_batch_services``
does); nothing else of moto changes.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from moto.batch import models
from moto.server import main

_describe = models.Job.describe


def describe(self: Any) -> dict[str, Any]:
    result: dict[str, Any] = _describe(self)
    code = getattr(self, "exit_code", None)
    if not self.job_stopped or code is None:
        return result
    result.setdefault("container", {})["exitCode"] = code
    attempts = [copy.deepcopy(attempt) for attempt in result.get("attempts") or []]
    if attempts:
        attempts[-1].setdefault("container", {})["exitCode"] = code
        result["attempts"] = attempts
    return result


models.Job.describe = describe

if __name__ == "__main__":
    sys.exit(main())
