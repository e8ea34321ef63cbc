"""Slurm specifics: job arrays, job-name idempotency, states without events, options."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from lost_runs import assert_killed_task_is_lost

from wove_adapters import Hub
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.policies import JobState
from wove_adapters.testing import tasks


def hub_for(cluster: dict[str, Any], **settings: Any) -> Hub:
    definition = {"executor": "slurm", "executor_config": dict(cluster), **settings}
    return Hub(environments={"hpc": definition}, default_environment="hpc")


def test_a_mapped_task_is_one_job_array(slurm_cluster: dict[str, Any]) -> None:
    with hub_for(slurm_cluster) as hub:
        transport = hub.dispatcher("hpc").transport
        adapter = transport.adapter  # type: ignore[attr-defined]
        before = adapter.submissions
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100)) == [i + 1 for i in range(100)]
        array_seconds = time.perf_counter() - start
        assert adapter.submissions - before == 1, "100 items should be one sbatch --array"
        assert transport.stats["array_submissions"] >= 1  # type: ignore[attr-defined]
    # The same 100 items as separate jobs (array batching off), for the closing note.
    cluster = {**slurm_cluster, "array_window": 0}
    with Hub(
        environments={
            "one": {
                "executor": "slurm",
                "executor_config": cluster,
                "delivery_idempotency_key": "{x}-" + uuid.uuid4().hex,
            }
        }
    ) as hub:
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100), environment="one") == [i + 1 for i in range(100)]
        single_seconds = time.perf_counter() - start
        singles = hub.dispatcher("one").transport.adapter.submissions  # type: ignore[attr-defined]
    print(
        f"slurm 100 items: array 1 submission {array_seconds:.2f}s; "
        f"separate {singles} submissions {single_seconds:.2f}s"
    )


def test_same_key_is_one_job(slurm_cluster: dict[str, Any], tmp_path: Path) -> None:
    key = f"slurm-{uuid.uuid4().hex[:8]}"
    with hub_for(slurm_cluster, delivery_idempotency_key=key) as hub:
        adapter = hub.dispatcher("hpc").transport.adapter  # type: ignore[attr-defined]
        before = adapter.submissions
        futures = [hub.submit(tasks.record, str(tmp_path), "k", 3) for _ in range(3)]
        assert [f.result(timeout=120) for f in futures] == [6, 6, 6]
        assert adapter.submissions - before == 1
    assert len((tmp_path / "k.runs").read_text().splitlines()) == 1


def test_job_name_dedupes_a_pending_job_across_callers(
    slurm_cluster: dict[str, Any], tmp_path: Path
) -> None:
    from wove_adapters.adapters.base import JobSpec
    from wove_adapters.adapters.slurm import SlurmAdapter

    adapter = SlurmAdapter(dict(slurm_cluster), environment="t")

    async def two_submits() -> tuple[str, str]:
        await adapter.start()
        job = JobSpec(
            run_id="r",
            task_id="t",
            attempt=1,
            payload="wove1.x",
            idempotency_key=f"dup-{uuid.uuid4().hex[:6]}",
            job_name="n",
            environment="t",
            options={"sbatch_lines": ["#SBATCH --begin=now+60"]},
        )
        first = await adapter.submit(job)
        second = await adapter.submit(job)
        await adapter.cancel(first)
        return first, second

    first, second = shared_loop.run_sync(two_submits())
    assert first == second


def test_a_job_that_dies_without_an_event_is_lost(
    slurm_cluster: dict[str, Any], tmp_path: Path
) -> None:
    # No heartbeat policy: only reconciliation (squeue/scontrol) can notice: the batch
    # step dies, Slurm records FAILED, no event.
    with hub_for(slurm_cluster, delivery_orphan_policy="fail") as hub:
        assert_killed_task_is_lost(hub, tmp_path, 60)


def test_state_map_covers_slurm_states() -> None:
    from wove_adapters.adapters.slurm import SlurmAdapter

    assert SlurmAdapter.map_state("COMPLETING") is JobState.RUNNING
    for lost in ("TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"):
        assert SlurmAdapter.map_state(lost) is JobState.FAILED
    assert SlurmAdapter.map_state("CANCELLED") is JobState.CANCELLED
    assert SlurmAdapter.map_state("SOMETHING_NEW") is JobState.UNKNOWN


def test_options_reach_the_batch_script(slurm_cluster: dict[str, Any]) -> None:
    cluster = {
        **slurm_cluster,
        "partition": "debug",
        "time": "00:05:00",
        "sbatch_lines": ["#SBATCH --comment=wove-test"],
    }
    with hub_for(cluster) as hub:
        future = hub.submit(tasks.add, 1)
        assert future.result(timeout=120) == 2
    shown = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True).stdout
    assert "Comment=wove-test" in shown and "TimeLimit=00:05:00" in shown


def test_a_held_job_is_reported_and_lost_naming_the_schedulers_reason(
    slurm_cluster: dict[str, Any], caplog: Any
) -> None:
    # A held job (here --hold; in the field "launch failed requeued held" or an admin's
    # hold) never starts by itself: the "has not started" warning and the lost-run error
    # say why, in squeue's words, so the operator need not go looking.
    from wove_adapters.core.errors import DeliveryOrphanedError

    caplog.set_level("WARNING", logger="wove_adapters.runtime")
    held_before = _held()
    cluster = {**slurm_cluster, "sbatch_lines": ["#SBATCH --hold"],
               "pending_warning_seconds": 1.0}
    with hub_for(cluster) as hub:
        waiting = hub.submit(tasks.add, 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _warnings(caplog, waiting.run_id):
            time.sleep(0.2)
        waiting.cancel()
    warned = _warnings(caplog, waiting.run_id)
    assert warned and all("backend state: pending (squeue reason: JobHeldUser)" in line
                          for line in warned), warned
    with hub_for(cluster, delivery_max_pending_seconds=4.0,
                 delivery_orphan_policy="fail") as hub:
        lost = hub.submit(tasks.add, 2)
        with pytest.raises(DeliveryOrphanedError) as info:
            lost.result(timeout=60)
    assert "backend state: pending (squeue reason: JobHeldUser)" in str(info.value)
    assert _held() <= held_before, "a held job of these runs is still queued"


def _held() -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "PENDING", "-o", "%i|%r"],
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if line.endswith("|JobHeldUser")}


def _warnings(caplog: Any, run_id: str) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if run_id in record.getMessage() and "has not started" in record.getMessage()]
