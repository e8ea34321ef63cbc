"""A run whose task is killed, with nothing to report it but the backend itself.

Without heartbeats, a task killed by SIGKILL sends no terminal event: only the backend's
own record of the job (reconciliation) can tell the caller, and with the orphan policy
"fail" the run must end as lost. The batch backends (Slurm, AWS Batch) check it alike.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


def assert_killed_task_is_lost(hub: Any, markers: Path, bound: float) -> None:
    """Start a long task on ``hub`` (orphan policy "fail", no heartbeats), SIGKILL its
    process once it runs, and expect the run to end as lost within ``bound`` seconds."""
    future = hub.submit(tasks.sleepy, str(markers), "doomed", 60.0)
    pid = int(wait_for_file(markers / "doomed.started", bound))
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(DeliveryOrphanedError, match="without a terminal event"):
        future.result(timeout=bound)
