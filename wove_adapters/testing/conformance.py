"""``AdapterConformance``: one suite, every adapter, the real backend.

A backend's test module provides the ``environment`` fixture (the backend and a real
worker are running; return ``{"executor": name, "executor_config": {...}}``) and, where
needed, overrides ``kill_worker`` (how to SIGKILL the process running a task, given the
pid the task reported) and ``worker_slots`` (how many tasks the worker runs at once).
Tests a capability does not claim are not skipped silently: each checks that the claim
is absent *and* that asking for it is refused at start-up.

Two scenarios every backend used to copy live here too: a real ``wove`` weave mapping
100 items through the backend, and the install hint when the backend's library is
missing (set ``extra`` and ``library`` on the subclass; a backend with no library of its
own leaves ``library`` empty and the test proves it starts without one).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import (
    DeliveryDetachedError,
    DeliveryOrphanedError,
    MissingBackendError,
    PayloadError,
    UnsupportedPolicyError,
)
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks

CancelledErrors = (concurrent.futures.CancelledError, asyncio.CancelledError)


def wait_for_file(path: Path, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            text = path.read_text()
            if text:
                return text
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout}s: the worker never ran the task")


class AdapterConformance:
    """Subclass and provide the ``environment`` fixture."""

    # Seconds a killed or cancelled run may take to be noticed on this backend.
    detection_timeout: float = 60.0
    heartbeat_seconds: float = 2.0
    # The ``wove-adapters[extra]`` that installs the backend's library, and the top-level
    # modules of that library (hidden in the missing-library test). Empty: no library.
    extra: str = ""
    library: tuple[str, ...] = ()
    # Whether this backend's worker runs chunks of a mapped call (``worker.chunks``).
    chunks: bool = False

    @pytest.fixture
    def environment(self) -> dict[str, Any]:
        raise NotImplementedError("a backend's test module provides the environment fixture")

    @pytest.fixture
    def worker_slots(self) -> int:
        """Tasks the worker runs at once (0: no queue; every job starts immediately)."""
        return 1

    def kill_worker(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def check_weave_pids(self, pids: set[int]) -> None:
        """Where the weave's mapped items ran; a backend that knows its worker's pid
        overrides this to say so exactly."""
        assert os.getpid() not in pids, "the weave's mapped items ran in the caller"

    @pytest.fixture
    def markers(self, tmp_path: Path) -> Path:
        path = tmp_path / "markers"
        path.mkdir()
        os.chmod(path, 0o777)
        return path

    @pytest.fixture
    def hub_for(self, environment: dict[str, Any]) -> Iterator[Any]:
        hubs: list[Hub] = []

        def make(**settings: Any) -> Hub:
            definition = {**environment, **settings}
            hub = Hub(environments={"conformance": definition}, default_environment="conformance")
            hubs.append(hub)
            return hub

        yield make
        for hub in hubs:
            hub.close()

    def capabilities(self, hub: Hub) -> Any:
        return hub.dispatcher("conformance").transport.capabilities

    # ------------------------------------------------------------ results

    def test_round_trip(self, hub_for: Any) -> None:
        hub = hub_for()
        assert hub.run(tasks.add, 1, y=2) == 3
        assert hub.run(tasks.add, 40) == 41
        assert hub.map(tasks.add, range(8)) == [i + 1 for i in range(8)]

    def test_exception_keeps_its_type(self, hub_for: Any) -> None:
        hub = hub_for()
        with pytest.raises(tasks.ConformanceError, match="broken on purpose"):
            hub.run(tasks.fail, "broken on purpose")

    def test_twenty_megabyte_argument(self, hub_for: Any) -> None:
        hub = hub_for()
        data = os.urandom(20 * 1024 * 1024)
        expected = tasks.digest(data)
        assert hub.run(tasks.digest, data) == expected

    # ------------------------------------------------------------ cancellation

    def _cancel_running(self, hub: Hub, markers: Path, mode: str) -> None:
        tag = f"cancel-{mode}-{uuid.uuid4().hex[:6]}"
        future = hub.submit(tasks.sleepy, str(markers), tag, 30.0)
        wait_for_file(markers / f"{tag}.started", self.detection_timeout)
        started = time.monotonic()
        hub.cancel(future, mode=mode)
        with pytest.raises(CancelledErrors):
            future.result(timeout=self.detection_timeout)
        assert time.monotonic() - started < self.detection_timeout
        if self.capabilities(hub).cancel_running:
            time.sleep(2.0)
            assert not (markers / f"{tag}.finished").exists(), "cancelled work went on running"

    def test_cancel_running_best_effort(self, hub_for: Any, markers: Path) -> None:
        self._cancel_running(hub_for(), markers, "best_effort")

    def test_cancel_running_require_ack(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(delivery_cancel_mode="require_ack")
        if not self.capabilities(hub).confirm_cancel:
            with pytest.raises(UnsupportedPolicyError, match="require_ack"):
                hub.run(tasks.add, 1)
            return
        self._cancel_running(hub, markers, "require_ack")

    def test_cancel_queued(self, hub_for: Any, markers: Path, worker_slots: int) -> None:
        hub = hub_for()
        if not self.capabilities(hub).cancel_queued:
            pytest.fail("every adapter must be able to cancel work that has not started")
        blockers = [
            hub.submit(tasks.sleepy, str(markers), f"block{i}", 4.0) for i in range(worker_slots)
        ]
        for i in range(worker_slots):
            wait_for_file(markers / f"block{i}.started", self.detection_timeout)
        queued = hub.submit(tasks.sleepy, str(markers), "queued", 0.1)
        if worker_slots:
            time.sleep(0.5)  # let it reach the backend's queue behind the blockers
        # worker_slots == 0: the backend has no queue (a job starts at once), so cancel
        # right after submission, before the job got going.
        hub.cancel(queued)
        with pytest.raises(CancelledErrors):
            queued.result(timeout=self.detection_timeout)
        for blocker in blockers:
            blocker.result(timeout=self.detection_timeout)
        time.sleep(2.0)
        assert not (markers / "queued.started").exists(), "a cancelled queued task still ran"

    # ------------------------------------------------------------ idempotency

    def test_idempotency_one_execution(self, hub_for: Any, markers: Path) -> None:
        key = f"conf-{uuid.uuid4().hex}"
        hub = hub_for(delivery_idempotency_key=key)
        first = hub.submit(tasks.record, str(markers), "idem", 21)
        second = hub.submit(tasks.record, str(markers), "idem", 21)
        assert first.result(timeout=self.detection_timeout) == 42
        assert second.result(timeout=self.detection_timeout) == 42
        runs = (markers / "idem.runs").read_text().splitlines()
        assert len(runs) == 1, f"same key ran {len(runs)} times"
        shared_loop.run_sync(hub.dispatcher("conformance").flush())
        # A key whose run already finished answers with the recorded result.
        assert hub.run(tasks.record, str(markers), "idem", 21) == 42
        assert len((markers / "idem.runs").read_text().splitlines()) == 1

    def test_idempotency_key_template(self, hub_for: Any, markers: Path) -> None:
        prefix = uuid.uuid4().hex[:8]
        hub = hub_for(delivery_idempotency_key=prefix + "-{tag}-{value}")
        results = [hub.submit(tasks.record, str(markers), "tmpl", v) for v in (1, 1, 2)]
        assert [f.result(timeout=self.detection_timeout) for f in results] == [2, 2, 4]
        assert len((markers / "tmpl.runs").read_text().splitlines()) == 2

    # ------------------------------------------------------------ trust

    def refusing_environment(self, environment: dict[str, Any]) -> dict[str, Any]:
        """The environment signing with a key its workers do not hold. Default: a fresh
        literal ``executor_config.secret`` (workers never read executor_config); an
        adapter that hands the secret to its workers overrides this to hand another."""
        config = dict(environment.get("executor_config") or {})
        config["secret"] = f"conformance-unheld-{uuid.uuid4().hex}"
        return {**environment, "executor_config": config}

    def test_refused_payload_fails_naming_the_key_and_is_not_requeued(
        self, environment: dict[str, Any], markers: Path
    ) -> None:
        """A worker that cannot verify a payload signs and sends nothing for it; the
        caller learns it from the backend's job status and raises PayloadError naming the
        key, instead of an empty CancelledError or a requeue loop."""
        definition = self.refusing_environment(environment)
        probe = Hub(environments={"conformance": definition}, default_environment="conformance")
        try:
            requeue = self.capabilities(probe).requeue
        finally:
            probe.close()
        if requeue:
            definition = {**definition, "delivery_orphan_policy": "requeue"}
        hub = Hub(environments={"conformance": definition}, default_environment="conformance")
        try:
            future = hub.submit(tasks.record, str(markers), "refused", 1)
            with pytest.raises(PayloadError) as info:
                future.result(timeout=self.detection_timeout)
            key_id = hub.dispatcher("conformance").key_id
            assert key_id in str(info.value), str(info.value)
            assert not (markers / "refused.runs").exists(), "a refused payload ran"
            shared_loop.run_sync(hub.dispatcher("conformance").flush())
            record = shared_loop.run_sync(
                hub.dispatcher("conformance").ledger.get(future.run_id)
            )
            assert record is not None and record.attempt == 1, "a refused payload was requeued"
        finally:
            hub.close()

    # ------------------------------------------------------------ liveness

    def test_heartbeats_keep_a_long_task_alive(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(delivery_heartbeat_seconds=1.0)
        assert hub.run(tasks.sleepy, str(markers), "long", 3.5) == "long"

    def _killed(self, hub: Hub, markers: Path, tag: str) -> concurrent.futures.Future[Any]:
        future = hub.submit(tasks.die_once, str(markers), tag)
        pid = int(wait_for_file(markers / f"{tag}.pid", self.detection_timeout))
        self.kill_worker(pid)
        return future

    def test_killed_worker_fail(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(
            delivery_orphan_policy="fail", delivery_heartbeat_seconds=self.heartbeat_seconds
        )
        future = self._killed(hub, markers, "kill-fail")
        with pytest.raises(DeliveryOrphanedError):
            future.result(timeout=self.detection_timeout)

    def test_killed_worker_cancel(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(
            delivery_orphan_policy="cancel", delivery_heartbeat_seconds=self.heartbeat_seconds
        )
        future = self._killed(hub, markers, "kill-cancel")
        with pytest.raises(CancelledErrors):
            future.result(timeout=self.detection_timeout)

    def test_killed_worker_requeue_yields_one_result(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(
            delivery_orphan_policy="requeue", delivery_heartbeat_seconds=self.heartbeat_seconds
        )
        if not self.capabilities(hub).requeue:
            with pytest.raises(UnsupportedPolicyError):
                hub.run(tasks.add, 1)
            return
        future = self._killed(hub, markers, "kill-requeue")
        assert future.result(timeout=self.detection_timeout * 2) == "kill-requeue-done"
        attempts = (markers / "kill-requeue.attempts").read_text().splitlines()
        assert len(attempts) >= 2, "the task was not run again after its worker died"

    def test_killed_worker_detach(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for(
            delivery_orphan_policy="detach", delivery_heartbeat_seconds=self.heartbeat_seconds
        )
        if not self.capabilities(hub).detach:
            with pytest.raises(UnsupportedPolicyError, match="detach"):
                hub.run(tasks.add, 1)
            return
        future = self._killed(hub, markers, "kill-detach")
        with pytest.raises(DeliveryDetachedError) as info:
            future.result(timeout=self.detection_timeout)
        assert info.value.run_id == future.run_id  # type: ignore[attr-defined]

    # ------------------------------------------------------------ the way back

    def test_duplicate_terminal_event_is_dropped(self, hub_for: Any) -> None:
        hub = hub_for()
        future = hub.submit(tasks.add, 1, y=1)
        assert future.result(timeout=self.detection_timeout) == 2
        receiver = getattr(hub.dispatcher("conformance").transport, "receiver", None)
        if receiver is None:
            pytest.fail("this adapter has no receiver; override this test with its native path")
        from wove_adapters.core.codec import frame_to_wire

        before = receiver.stats["duplicates_dropped"]
        event = frame_to_wire(
            {"type": "task_result", "run_id": future.run_id, "task_id": "add", "result": 999}
        )
        _post_signed(receiver, hub, event)
        assert receiver.stats["duplicates_dropped"] == before + 1

    def test_unreachable_receiver_events_are_retried(self, hub_for: Any, markers: Path) -> None:
        hub = hub_for()
        receiver = getattr(hub.dispatcher("conformance").transport, "receiver", None)
        if receiver is None:
            pytest.fail("this adapter has no receiver; override this test with its native path")
        future = hub.submit(tasks.sleepy, str(markers), "offline", 1.0)
        wait_for_file(markers / "offline.started", self.detection_timeout)
        shared_loop.run_sync(receiver.pause())
        try:
            wait_for_file(markers / "offline.finished", 30)
            time.sleep(2.0)
            assert not future.done()
        finally:
            shared_loop.run_sync(receiver.resume())
        assert future.result(timeout=self.detection_timeout) == "offline"


    # ------------------------------------------------------------ chunked mapped calls

    def test_mapped_call_travels_in_chunks(self, hub_for: Any) -> None:
        """200 runs of one mapped call reach the backend as a few messages (where its
        worker runs chunks), each run with its own result, in order."""
        hub = hub_for(map_chunk_size=25)
        transport = hub.dispatcher("conformance").transport
        stats = getattr(transport, "stats", {})
        before = dict(stats)
        assert hub.map(tasks.add, range(200)) == [i + 1 for i in range(200)]
        assert transport.supports_chunks is self.chunks
        sent = stats.get("chunked_runs", 0) - before.get("chunked_runs", 0)
        if not self.chunks:
            assert sent == 0
            return
        messages = stats["chunk_submissions"] - before["chunk_submissions"]
        assert sent >= 150, f"only {sent} of 200 runs travelled in chunks"
        assert messages <= 20, f"{messages} chunks for 200 runs of chunk size 25"

    def test_cancel_inside_a_chunk_keeps_the_run_from_starting(
        self, hub_for: Any, markers: Path
    ) -> None:
        """Runs cancelled while they wait in a chunk behind a long one never start, and
        end cancelled at once; the long one finishes with its own result."""
        hub = hub_for(map_chunk_size=4)
        dispatcher = hub.dispatcher("conformance")
        assert dispatcher.transport.supports_chunks is self.chunks
        if not self.chunks:
            return  # test_mapped_call_travels_in_chunks shows this backend sends runs alone
        items = [(str(markers), f"chunk{i}", 3.0 if i == 0 else 0.0) for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            mapped = pool.submit(hub.map, tasks.sleepy_item, items, error_mode="return")
            wait_for_file(markers / "chunk0.started", self.detection_timeout)
            waiting = {
                run_id: run.attempt.func.args[0][1]
                for run_id, run in list(dispatcher.runs.items())
                if run.attempt.task_id.endswith("sleepy_item")
            }
            ran = {tag for tag in waiting.values() if (markers / f"{tag}.started").exists()}
            cancelled = {run_id: tag for run_id, tag in waiting.items() if tag not in ran}
            assert cancelled, "every run of the chunk started before the long one"
            started = time.monotonic()
            for run_id in cancelled:
                hub.cancel(run_id)
            assert time.monotonic() - started < 5.0, "a cancel inside a chunk waited"
            values = mapped.result(timeout=self.detection_timeout)
        assert values[0] == "chunk0"
        for index, value in enumerate(values):
            if f"chunk{index}" in cancelled.values():
                assert isinstance(value, CancelledErrors), value
        time.sleep(1.0)
        for tag in cancelled.values():
            assert not (markers / f"{tag}.started").exists(), f"cancelled {tag} started"

    def test_killed_worker_inside_a_chunk_requeues_each_run(
        self, hub_for: Any, markers: Path
    ) -> None:
        """The worker running a chunk dies: the run that finished before keeps its one
        result, every other run of the chunk gets its own orphan policy (requeue: each
        runs again alone). Counted: results lost 0, wrong or duplicated results 0."""
        hub = hub_for(map_chunk_size=4, delivery_orphan_policy="requeue",
                      delivery_heartbeat_seconds=self.heartbeat_seconds)
        dispatcher = hub.dispatcher("conformance")
        assert dispatcher.transport.supports_chunks is self.chunks
        if not self.chunks or not self.capabilities(hub).requeue:
            return  # runs travel alone: test_killed_worker_requeue_yields_one_result
        tags = [f"member{i}" for i in range(4)]
        items = [(str(markers), tag, tag == "member1") for tag in tags]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            mapped = pool.submit(hub.map, tasks.chunk_member, items)
            pid = int(wait_for_file(markers / "member1.pid", self.detection_timeout))
            deadline = time.monotonic() + self.detection_timeout
            while time.monotonic() < deadline and any(  # member0 reported before the kill
                run.attempt.func.args[0][1] == "member0" for run in dispatcher.runs.values()
            ):
                time.sleep(0.02)
            self.kill_worker(pid)
            values = mapped.result(timeout=self.detection_timeout * 2)
        assert values == tags
        runs = {tag: len((markers / f"{tag}.runs").read_text().splitlines()) for tag in tags}
        assert runs["member1"] >= 2, "the killed run was not run again"
        assert all(count >= 1 for count in runs.values()), runs

    # ------------------------------------------------------------ wove and installs

    def test_wove_weave_maps_100_items(self, environment: dict[str, Any]) -> None:
        """A real weave: a local task's 100 items mapped through this backend."""
        try:
            import wove
        except ImportError:
            pytest.fail("this scenario needs wove 2.x: pip install 'wove-adapters[wove]'")
        from wove_adapters.integration.wove import executor

        settings = {k: v for k, v in environment.items()
                    if k not in ("executor", "executor_config")}
        remote = executor(environment["executor"],
                          executor_config=dict(environment.get("executor_config") or {}),
                          **settings)
        wove.config(environments={"conformance": {"executor": remote}})
        chunked_before = _chunked_runs()
        try:
            result = weave_map_100("conformance")
            self.check_weave_pids({pid for _, pid in result.double})
            # wove's mapped items reach the executor one by one; those sent together
            # travel in chunks where the backend runs them.
            sent = _chunked_runs() - chunked_before
            assert (sent > 0) is self.chunks, f"{sent} of the weave's runs went in chunks"
        finally:
            wove.config(environments={"default": {"executor": "local"}},
                        default_environment="default")

    def test_missing_library_names_the_extra(
        self, environment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without the backend's library the first use fails with the pip command that
        installs it, not an ImportError from deep inside the adapter."""
        # An environment name of its own: dispatchers are shared per process by name and
        # settings, and one started by an earlier test already holds the library.
        name = f"conformance-missing-{uuid.uuid4().hex[:8]}"
        with Hub(environments={name: environment}, default_environment=name) as hub:
            if not self.library:
                # Nothing to install: the adapter must start and run with no extra at all.
                assert self.extra == "", "an extra without a library to hide: set `library`"
                assert hub.run(tasks.add, 1) == 2
                return
            for module in self.library:
                monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
            hint = re.escape(f"pip install 'wove-adapters[{self.extra}]'")
            with pytest.raises(MissingBackendError, match=hint):
                hub.run(tasks.add, 1)
            monkeypatch.undo()  # the library is back before the hub closes


def weave_map_100(environment: str) -> Any:
    """A real wove weave: a local task's 100 items, each doubled in ``environment`` (with
    the pid that ran it), summed by a local task that consumes the mapped result. Checks
    the values and returns the weave's result (``.double``: (value, pid) pairs)."""
    import wove

    with wove.weave() as w:

        @w.do
        def items() -> list[int]:
            return list(range(100))

        @w.do("items", environment=environment)
        def double(item: int) -> tuple[int, int]:
            return item * 2, os.getpid()

        @w.do
        def total(double: list[tuple[int, int]]) -> int:
            return sum(value for value, _ in double)

    assert [value for value, _ in w.result.double] == [i * 2 for i in range(100)]
    assert w.result.total == 9900
    return w.result


def _chunked_runs() -> int:
    """Runs this process's dispatchers have sent in chunks so far."""
    from wove_adapters.integration.environments import running_dispatchers

    return sum(getattr(d.transport, "stats", {}).get("chunked_runs", 0)
               for d in running_dispatchers())


def _post_signed(receiver: Any, hub: Hub, event: Any) -> None:
    import urllib.request

    from wove_adapters.core import signing
    from wove_adapters.worker import sender

    key_id = hub.dispatcher("conformance").key_id
    data = signing.encode_blob(sender.sign_events([event], key_id))
    request = urllib.request.Request(receiver.url, data=data, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
