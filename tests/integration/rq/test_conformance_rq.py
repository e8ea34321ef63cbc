"""The shared conformance suite against a real Redis and a real ``rq worker`` process."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from backend_conformance import BackendConformance
from rq_services import redis_client

from wove_adapters.core import loop as shared_loop
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file


class TestRqConformance(BackendConformance):
    executor = "rq"
    service = "rq_environment"
    slots = 1  # one forking rq worker: one job at a time

    def executor_config(self, service: dict[str, Any]) -> dict[str, Any]:
        return dict(service["executor_config"])

    # kill_worker: the default SIGKILLs the pid the task reported, which is the RQ
    # work-horse (the worker itself survives and marks the job failed).


class TestRqDropboxConformance(TestRqConformance):
    """The same suite over the ``redis`` return path: the work-horse RPUSHes signed
    events to a Redis list the caller reads; it never opens a connection to the caller.
    Runs travel alone: a chunk hears of its cancelled runs only in a receiver's answers."""

    chunks = False

    def executor_config(self, service: dict[str, Any]) -> dict[str, Any]:
        config = super().executor_config(service)  # the events go to the job queue's Redis
        return {**config, "return_path": "redis", "return_redis_url": config["redis_url"]}

    def _reader(self, hub: Hub) -> Any:
        from wove_adapters.callbacks.dropbox import DropboxReader

        reader = getattr(hub.dispatcher("conformance").transport, "receiver", None)
        assert isinstance(reader, DropboxReader)
        return reader

    def test_round_trip(self, hub_for: Any) -> None:
        super().test_round_trip(hub_for)
        reader = self._reader(hub_for())
        assert reader.stats["accepted"] > 0 and reader.redis_url.startswith("redis://")

    def test_duplicate_terminal_event_is_dropped(self, hub_for: Any) -> None:
        from wove_adapters.core import signing
        from wove_adapters.core.codec import frame_to_wire
        from wove_adapters.worker import sender

        hub = hub_for()
        future = hub.submit(tasks.add, 1, y=1)
        assert future.result(timeout=self.detection_timeout) == 2
        reader = self._reader(hub)
        before = reader.stats["duplicates_dropped"]
        event = frame_to_wire(
            {"type": "task_result", "run_id": future.run_id, "task_id": "add", "result": 999}
        )
        key_id = hub.dispatcher("conformance").key_id
        client = redis_client()
        client.rpush(reader.key, signing.encode_blob(sender.sign_events([event], key_id)))
        client.close()
        deadline = time.monotonic() + 10
        while reader.stats["duplicates_dropped"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reader.stats["duplicates_dropped"] == before + 1

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Path) -> None:
        """The drop box's version: while the caller does not read, events wait in Redis."""
        hub = hub_for()
        reader = self._reader(hub)
        future = hub.submit(tasks.sleepy, str(markers), "offline", 1.0)
        wait_for_file(markers / "offline.started", self.detection_timeout)

        async def stop_reading() -> None:
            reader._task.cancel()
            with contextlib.suppress(BaseException):
                await reader._task

        async def start_reading() -> None:
            reader._task = asyncio.get_running_loop().create_task(reader._read())

        shared_loop.run_sync(stop_reading())
        try:
            wait_for_file(markers / "offline.finished", 30)
            time.sleep(1.0)
            assert not future.done()
            assert redis_client().llen(reader.key) >= 1
        finally:
            shared_loop.run_sync(start_reading())
        assert future.result(timeout=self.detection_timeout) == "offline"
