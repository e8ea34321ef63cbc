"""Dask-specific behaviour on the CLI-started cluster (and one owned LocalCluster)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from dask_cluster_helpers import WORKERS, DaskCluster, wait_for_workers

from wove_adapters.adapters.dask import DaskAdapter, check_workers
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file
from wove_adapters.testing.tasks import opens_on_unpickle
from wove_adapters.worker import hosted

# Task functions below travel by value: the workers cannot import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def worker_address() -> str:
    from distributed import get_worker

    return str(get_worker().address)


def flaky(directory: str, tag: str) -> str:
    """Fails on its first execution, succeeds on the next (Dask ``retries``)."""
    path = Path(directory, f"{tag}.tries")
    with open(path, "a") as handle:
        handle.write("x\n")
    if len(path.read_text().splitlines()) == 1:
        raise RuntimeError("first try fails")
    return "ok"


@pytest.fixture
def address(dask_cluster: DaskCluster) -> str:
    wait_for_workers(dask_cluster.address)
    return dask_cluster.address


def _hub(definition: dict[str, Any], name: str = "d") -> Hub:
    return Hub(environments={name: definition}, default_environment=name)


def _adapter(hub: Hub) -> DaskAdapter:
    adapter = hub.dispatcher().transport.adapter  # type: ignore[attr-defined]
    assert isinstance(adapter, DaskAdapter)
    return adapter


def _scheduler_keys(address: str) -> list[str]:
    from distributed import Client

    with Client(address, timeout=30) as client:
        keys = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks))
        return [str(k) for k in keys]


# ---------------------------------------------------------------- the worker side


def test_plain_cli_workers_run_payloads(address: str) -> None:
    """`dask worker ADDRESS` with wove-adapters installed is the whole worker side: the
    function travels by reference to ``worker.hosted``."""
    from distributed import Client

    assert hosted.run_dask.__module__ == "wove_adapters.worker.hosted"
    with Client(address, timeout=30) as client:
        versions = check_workers(client)
    assert len(versions) == WORKERS
    for path in ("http", "native"):
        hub = _hub({"executor": "dask",
                    "executor_config": {"address": address, "return_path": path}})
        try:
            assert hub.run(tasks.add, 2, y=3) == 5
        finally:
            hub.close()


# ---------------------------------------------------------------- options


def test_options_pass_through(address: str, markers: Path) -> None:
    from distributed import Client

    with Client(address, timeout=30) as client:
        target = sorted(client.scheduler_info()["workers"])[0]
    hub = _hub({"executor": "dask", "executor_config": {
        "address": address, "return_path": "native",
        "task_options": {"workers": [target], "allow_other_workers": False,
                         "resources": {"slot": 1}, "priority": 10, "retries": 1},
    }}, name="options")
    try:
        assert {hub.run(worker_address) for _ in range(4)} == {target}
        # retries reach Dask: the first execution fails, Dask runs it again.
        assert hub.run(flaky, str(markers), "flaky") == "ok"
        assert len((markers / "flaky.tries").read_text().splitlines()) == 2
    finally:
        hub.close()


def test_unsatisfiable_resources_stay_pending_and_cancel(address: str, markers: Path) -> None:
    hub = _hub({"executor": "dask", "executor_config": {
        "address": address, "resources": {"gpu": 1}}}, name="no-gpu")
    try:
        future = hub.submit(tasks.sleepy, str(markers), "gpu", 0.1)
        adapter = _adapter(hub)
        deadline = time.monotonic() + 30
        while not adapter._tracked and time.monotonic() < deadline:
            time.sleep(0.02)
        (handle,) = list(adapter._tracked)
        time.sleep(1.0)
        assert shared_loop.run_sync(adapter.status(handle)) is JobState.PENDING
        hub.cancel(future)
        with pytest.raises(CancelledErrors):
            future.result(timeout=30)
        time.sleep(0.5)
        assert not (markers / "gpu.started").exists()
        assert shared_loop.run_sync(adapter.status(handle)) is JobState.CANCELLED
    finally:
        hub.close()


# ---------------------------------------------------------------- idempotency


def test_idempotency_uses_the_dask_key(address: str, markers: Path) -> None:
    """Two callers that do not share a ledger (so nothing but Dask can dedupe) submit the
    same key: one Dask task, one execution, both get the result (native path)."""
    key = f"dask-idem-{uuid.uuid4().hex[:8]}"
    hubs = [
        _hub({"executor": "dask", "ledger": f"memory://dask-idem-{i}",
              "delivery_idempotency_key": key,
              "executor_config": {"address": address, "return_path": "native"}}, name=f"idem{i}")
        for i in range(2)
    ]
    try:
        first = hubs[0].submit(tasks.record, str(markers), "idem", 5)
        second = hubs[1].submit(tasks.record, str(markers), "idem", 5)
        wait_for_file(markers / "idem.runs", 30)
        assert f"wove-key-{key}" in _scheduler_keys(address)
        assert first.result(timeout=30) == 10
        assert second.result(timeout=30) == 10
        assert len((markers / "idem.runs").read_text().splitlines()) == 1
    finally:
        for hub in hubs:
            hub.close()


def test_dask_keys_are_sanitised() -> None:
    from wove_adapters.adapters.base import JobSpec

    adapter = DaskAdapter({"address": "tcp://127.0.0.1:1"}, environment="e")
    job = JobSpec(run_id="t:abc", task_id="t", attempt=1, payload="", idempotency_key="a b/c",
                  job_name="x", environment="e")
    key = adapter.dask_key(job)
    assert key.startswith("wove-key-a-b-c-") and " " not in key and "/" not in key
    job.attempt = 2
    assert adapter.dask_key(job) == f"{key}-a2"  # a requeued attempt is a new Dask task


# ---------------------------------------------------------------- outcomes in the futures


def tampering() -> Callable[..., Any]:
    """``run_dask``, with one bit of the signed outcome it returns flipped (a writer of a
    Dask worker's memory, or of the comms). A local function: Dask ships it by value."""

    def tampered(payload: str, returned: bool = False) -> Any:
        value = hosted.run_dask(payload, returned)
        if isinstance(value, bytes):
            return value[:-8] + bytes([value[-8] ^ 1]) + value[-7:]
        return value

    return tampered


def _accepted(hub: Hub) -> int:
    """Event batches the caller's receiver accepted so far (shared: compare deltas)."""
    return int(hub.dispatcher().transport.receiver.stats["accepted"])  # type: ignore[attr-defined]


def test_a_burst_returns_outcomes_in_futures_a_single_run_posts(address: str) -> None:
    """With several runs in flight, a short run's signed terminal event is its future's
    value (one gather per loop iteration, no POST); a run alone POSTs it (the faster way
    for one result: no round trip through the scheduler)."""
    hub = _hub({"executor": "dask", "executor_config": {"address": address}})
    try:
        assert hub.run(tasks.add, 1) == 2
        before = _accepted(hub)
        assert hub.run(tasks.add, 2) == 3
        assert _accepted(hub) == before + 1
        adapter = _adapter(hub)
        gathers: list[int] = []
        gather = adapter.client.gather

        def counted(futures: Any, *args: Any, **kwargs: Any) -> Any:
            gathers.append(len(futures))
            return gather(futures, *args, **kwargs)

        adapter.client.gather = counted
        try:
            assert hub.map(tasks.add, range(40), map_chunk_size=0) == list(range(1, 41))
        finally:
            adapter.client.gather = gather
        # Outcomes that finish close together share a gather (GATHER_WINDOW).
        assert sum(gathers) == 40 and len(gathers) <= 10, gathers
        with pytest.raises(tasks.ConformanceError, match="boom"):
            hub.map(tasks.fail, ["boom"] * 8, map_chunk_size=0)
        assert _accepted(hub) <= before + 1 + 3  # a batch that left before the rest
    finally:
        hub.close()


def test_a_tampered_outcome_in_a_future_is_never_unpickled(
    address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A returned outcome that fails its signature check is not routed and nothing in it
    is unpickled: the run is lost (its orphan policy applies), not resolved."""
    hub = _hub({"executor": "dask", "executor_config": {"address": address},
                "delivery_orphan_policy": "fail"})
    markers = [str(tmp_path / f"unpickled-{i}") for i in range(8)]
    try:
        hub.run(tasks.add, 1)
        monkeypatch.setattr(hosted, "run_dask", tampering())
        with pytest.raises(DeliveryOrphanedError, match="did not verify"):
            hub.map(opens_on_unpickle, markers, map_chunk_size=0)
        monkeypatch.undo()
        assert not any(Path(marker).exists() for marker in markers)
        hub.map(opens_on_unpickle, markers, map_chunk_size=0)  # honest: checked, unpickled
        assert all(Path(marker).exists() for marker in markers)
    finally:
        hub.close()


# ---------------------------------------------------------------- lost runs


def test_dead_worker_found_by_status_alone(
    address: str, markers: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Dask future's own report is switched off: reconciliation through status() must
    see the job died without a terminal event, and the orphan policy (fail) applies."""
    from wove_adapters.adapters import dask as dask_adapter

    hub = _hub({"executor": "dask", "delivery_orphan_policy": "fail",
                "executor_config": {"address": address, "reconcile_seconds": 0.5}},
               name="reconcile")
    try:
        hub.run(tasks.add, 1)
        monkeypatch.setattr(dask_adapter, "_frame_for", lambda *args, **kwargs: None)
        future = hub.submit(tasks.die_once, str(markers), "reconcile")
        pid = int(wait_for_file(markers / "reconcile.pid", 30))
        os.kill(pid, 9)
        with pytest.raises(DeliveryOrphanedError, match="reports the job failed"):
            future.result(timeout=60)
    finally:
        hub.close()


@pytest.mark.parametrize(("native", "state"), [
    ("processing", JobState.RUNNING), ("queued", JobState.PENDING),
    ("no-worker", JobState.PENDING), ("memory", JobState.SUCCEEDED),
    ("erred", JobState.FAILED), ("finished", JobState.SUCCEEDED),
    ("cancelled", JobState.CANCELLED), ("lost", JobState.GONE),
    ("something-new", JobState.UNKNOWN),
])
def test_status_mapping(native: str, state: JobState) -> None:
    assert DaskAdapter.map_state(native) is state
    assert DaskAdapter.map_state(None) is JobState.UNKNOWN


# ---------------------------------------------------------------- wove


# ---------------------------------------------------------------- owned LocalCluster


def test_local_cluster_is_owned_and_loopback_only() -> None:
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    hub = _hub({"executor": "dask", "executor_config": {
        "cluster": "local", "n_workers": 1, "return_path": "native"}}, name="local")
    try:
        assert hub.map(tasks.add, range(5)) == [i + 1 for i in range(5)]
        adapter = _adapter(hub)
        assert adapter.cluster is not None
        me = psutil.Process()
        processes = [me, *me.children(recursive=True)]
        listening = [
            conn.laddr for proc in processes for conn in proc.net_connections("tcp")
            if conn.status == psutil.CONN_LISTEN
        ]
        assert listening, "the local cluster listens nowhere?"
        assert all(addr.ip == "127.0.0.1" for addr in listening), listening
        async def allowed_failures() -> int:
            return int(await adapter.client.run_on_scheduler(
                lambda dask_scheduler: dask_scheduler.allowed_failures))

        failures = shared_loop.run_sync(allowed_failures())
        assert failures == 0
        workers = [p for p in me.children(recursive=True)  # not the resource tracker
                   if p.pid not in before and "spawn_main" in " ".join(p.cmdline())]
        assert workers
    finally:
        hub.close()
        from wove_adapters.integration.environments import stop_all

        shared_loop.run_sync(stop_all(), 60)  # stops the owned cluster with its dispatcher
    assert adapter.cluster is None
    deadline = time.monotonic() + 30
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers):
        alive = [(p.pid, p.cmdline()) for p in workers if p.is_running()]
        assert time.monotonic() < deadline, f"LocalCluster workers outlived close: {alive}"
        time.sleep(0.1)


# ---------------------------------------------------------------- doctor, errors


def test_doctor_rows(address: str) -> None:
    def rows_for(config: dict[str, Any]) -> list[tuple[str, bool, str]]:
        adapter = DaskAdapter(config, environment="doctor")

        async def go() -> list[tuple[str, bool, str]]:
            await adapter.start()
            try:
                return await adapter.doctor()
            finally:
                await adapter.aclose()

        return shared_loop.run_sync(go(), 60)

    rows = rows_for({"address": address})
    assert [check for check, _, _ in rows] == [
        "dask scheduler reachable", "dask workers connected",
        "workers import wove_adapters", "scheduler allowed-failures is 0",
    ]
    assert all(ok for _, ok, _ in rows), rows


def test_unreachable_scheduler_is_a_clear_start_error() -> None:
    hub = _hub({"executor": "dask", "executor_config": {
        "address": "tcp://127.0.0.1:1", "connect_timeout": 2}}, name="nowhere")
    try:
        with pytest.raises(ConnectionError, match="dask scheduler"):
            hub.run(tasks.add, 1)
    finally:
        hub.close()


def test_missing_config_is_a_clear_start_error() -> None:
    hub = _hub({"executor": "dask", "executor_config": {}}, name="unconfigured")
    try:
        with pytest.raises(ValueError, match="needs 'address'"):
            hub.run(tasks.add, 1)
    finally:
        hub.close()
