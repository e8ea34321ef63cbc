"""The Temporal adapter passes the conformance suite against a real dev server and a real
worker process: callback return path (default) and the native one (workflow results)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from temporal_services import WORKER_SLOTS

from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


class TestTemporalConformance(BackendConformance):
    executor = "temporal"
    service = "temporal_config"
    slots = WORKER_SLOTS


class TestTemporalNativeConformance(TestTemporalConformance):
    """``return_path: "native"``: no receiver; the workflow's result is the way back."""

    options = {"return_path": "native"}

    def test_duplicate_terminal_event_is_dropped(  # type: ignore[override]
        self, hub_for: Any, markers: Any
    ) -> None:
        """Two outcomes for one run (a replayed result, a racing follower): the caller sees
        the first; the later one, and the workflow's own result after it, are dropped."""
        hub: Hub = hub_for()
        future = hub.submit(tasks.sleepy, str(markers), "native-dup", 2.0)
        wait_for_file(markers / "native-dup.started", self.detection_timeout)
        transport: Any = hub.dispatcher("conformance").transport
        assert transport.receiver is None, "the native path must not start a receiver"
        run_id = future.run_id
        first = frames.event(frames.TASK_RESULT, run_id, "sleepy", 1, result="first")
        second = frames.event(frames.TASK_RESULT, run_id, "sleepy", 1, result="second")
        shared_loop.run_sync(_emit_on_loop(transport.adapter, first, second))
        assert future.result(timeout=self.detection_timeout) == "first"
        wait_for_file(markers / "native-dup.finished", self.detection_timeout)
        assert hub.run(tasks.add, 1) == 2

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Any) -> None:
        """No receiver to be unreachable: the outcome waits in Temporal's history, so a
        result recorded while the caller was not following still arrives."""
        hub: Hub = hub_for()
        future = hub.submit(tasks.sleepy, str(markers), "native-later", 1.0)
        wait_for_file(markers / "native-later.finished", self.detection_timeout)
        time.sleep(1.0)  # the workflow closed before anyone asked for its result again
        assert future.result(timeout=self.detection_timeout) == "native-later"


async def _emit_on_loop(adapter: Any, *frames_: dict[str, Any]) -> None:
    for frame in frames_:
        adapter.emit(frame)
