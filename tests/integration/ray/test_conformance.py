"""The Ray adapter passes the conformance suite against a real Ray cluster, on both
return paths: the callback receiver (``http``) and the ObjectRef itself (``native``)."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from ray_cluster_helpers import RayCluster

from wove_adapters.core import loop as shared_loop
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


class TestRayConformance(BackendConformance):
    executor = "ray"
    service = "ray_head"
    slots = 2  # the head offers 2 CPUs; each task asks for 1

    def executor_config(self, service: RayCluster) -> dict[str, Any]:
        return {"address": service.address}


class TestRayNativeConformance(TestRayConformance):
    """``return_path: "native"``: no receiver, the ObjectRef carries the outcome."""

    options = {"return_path": "native"}

    def test_duplicate_terminal_event_is_dropped(self, hub_for: Any) -> None:
        """No receiver here; a second terminal event for a finished run (as a late Ray
        report would be) changes nothing."""
        hub = hub_for()
        transport = hub.dispatcher("conformance").transport
        assert getattr(transport, "receiver", None) is None
        future = hub.submit(tasks.add, 1, y=1)
        assert future.result(timeout=self.detection_timeout) == 2
        adapter = transport.adapter

        async def duplicate() -> None:
            adapter.emit({"type": "task_result", "run_id": future.run_id,  # type: ignore[attr-defined]
                          "task_id": "add", "attempt": 1, "result": 999})

        shared_loop.run_sync(duplicate())
        assert future.result(timeout=1) == 2
        assert hub.run(tasks.add, 2) == 3

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Path) -> None:
        """The native analogue: an outcome produced while the caller cannot listen (its
        loop is blocked) waits in Ray's object store and arrives afterwards."""
        hub = hub_for()
        tag = f"busy-{uuid.uuid4().hex[:6]}"
        future = hub.submit(tasks.sleepy, str(markers), tag, 1.0)
        wait_for_file(markers / f"{tag}.started", self.detection_timeout)

        async def block_the_loop() -> None:
            time.sleep(3.0)  # noqa: ASYNC251 - deliberately blocking: the caller is unresponsive

        shared_loop.run_sync(block_the_loop())
        assert (markers / f"{tag}.finished").exists()
        assert future.result(timeout=self.detection_timeout) == tag
