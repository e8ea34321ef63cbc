"""The Dask adapter passes the conformance suite on a real CLI-started cluster, on both
return paths: the callback receiver (``http``, default) and the Dask future (``native``).

The native path has no receiver, so its two receiver tests are replaced by what they
check, on the path it has: a late or duplicate terminal event never reaches the caller
twice, and an outcome that could not be taken in at once is kept by Dask and arrives.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from dask_cluster_helpers import WORKERS, DaskCluster, wait_for_workers

from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file


class TestDaskConformance(BackendConformance):
    executor = "dask"
    service = "dask_cluster"
    slots = WORKERS
    options = {"return_path": "http"}

    def executor_config(self, service: DaskCluster) -> dict[str, Any]:
        wait_for_workers(service.address)  # a previous kill may still be restarting
        return {"address": service.address}


class TestDaskNativeConformance(TestDaskConformance):
    options = {"return_path": "native"}

    def test_duplicate_terminal_event_is_dropped(self, hub_for: Any, markers: Any) -> None:
        hub = hub_for()
        dispatcher = hub.dispatcher("conformance")
        assert getattr(dispatcher.transport, "receiver", None) is None, "native: no receiver"
        future = hub.submit(tasks.add, 1, y=1)
        assert future.result(timeout=self.detection_timeout) == 2
        adapter = dispatcher.transport.adapter  # type: ignore[attr-defined]
        # What a re-run or a second watcher would produce: a second terminal for the run.
        late = frames.event(frames.TASK_RESULT, future.run_id, "add", 1, result=999)  # type: ignore[attr-defined]
        shared_loop.run_sync(_call_on_loop(adapter.emit, late))
        assert future.result(timeout=1) == 2
        assert future.run_id not in dispatcher.runs  # type: ignore[attr-defined]

        # A run cancelled by the caller: the Dask future then reports its own cancellation,
        # which must be dropped, not delivered as a second outcome.
        tag = f"dup-{uuid.uuid4().hex[:6]}"
        slow = hub.submit(tasks.sleepy, str(markers), tag, 3.0)
        wait_for_file(markers / f"{tag}.started", self.detection_timeout)
        hub.cancel(slow)
        with pytest.raises(CancelledErrors):
            slow.result(timeout=self.detection_timeout)
        deadline = time.monotonic() + 10
        while adapter._tracked and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not adapter._tracked, "the adapter still holds a future after cancellation"
        assert slow.run_id not in dispatcher.runs  # type: ignore[attr-defined]

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Any) -> None:
        """Native: the outcome waits in the worker's memory until the caller takes it. The
        caller's loop is made unresponsive while the task finishes; the result arrives."""
        hub = hub_for()
        dispatcher = hub.dispatcher("conformance")
        assert getattr(dispatcher.transport, "receiver", None) is None
        tag = f"offline-{uuid.uuid4().hex[:6]}"
        future = hub.submit(tasks.sleepy, str(markers), tag, 1.0)
        wait_for_file(markers / f"{tag}.started", self.detection_timeout)
        blocked = shared_loop.submit(_block_loop(4.0))  # the caller hears nothing meanwhile
        wait_for_file(markers / f"{tag}.finished", 30)
        assert not future.done()
        blocked.result(timeout=30)
        assert future.result(timeout=self.detection_timeout) == tag


async def _call_on_loop(fn: Any, *args: Any) -> None:
    fn(*args)


async def _block_loop(seconds: float) -> None:
    time.sleep(seconds)  # noqa: ASYNC251 - on purpose: a caller that cannot listen
