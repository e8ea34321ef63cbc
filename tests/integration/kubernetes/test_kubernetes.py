"""Kubernetes Jobs specifics: names, 409 -> attach, Indexed Jobs for mapped tasks, delete
propagation, Pods that never start, Jobs that die without an event, options, doctor."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from kube_services import CAPACITY, NAMESPACE, KubeCluster
from services import pid_alive, wait_until

from wove_adapters import DeliveryOrphanedError, Hub
from wove_adapters.adapters.base import JobSpec
from wove_adapters.adapters.kubernetes_jobs import KubernetesJobsAdapter
from wove_adapters.adapters.kubernetes_manifest import (
    dns_label,
    label_value,
    native_state,
    refused,
)
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import PayloadError
from wove_adapters.core.policies import JobState
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

RFC1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
Cancelled = (concurrent.futures.CancelledError,)
# Submissions within this window form one Indexed Job; generous, so a busy machine
# building 100 envelopes cannot split one mapped task into two Jobs.
BATCH = {"array_window": 0.5}


def hub_for(cluster: KubeCluster, name: str = "k8s", *, config: dict[str, Any] | None = None,
            **settings: Any) -> Hub:
    definition = {"executor": "kubernetes_jobs",
                  "executor_config": cluster.config(**(config or {})), **settings}
    return Hub(environments={name: definition}, default_environment=name)


def adapter_of(hub: Hub, name: str = "k8s") -> KubernetesJobsAdapter:
    adapter = hub.dispatcher(name).transport.adapter  # type: ignore[attr-defined]
    assert isinstance(adapter, KubernetesJobsAdapter)
    return adapter


def job_of_run(cluster: KubeCluster, run_id: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for job in cluster.jobs(namespace, "app.kubernetes.io/managed-by=wove-adapters"):
            if job["metadata"].get("annotations", {}).get("wove-adapters/run-id") == run_id:
                return job
        time.sleep(0.1)
    raise AssertionError(f"no Job carries run {run_id}")


def fail_on_three(item: int) -> int:
    if item == 3:
        raise tasks.ConformanceError(f"item {item} is broken")
    return item * 10


# ---------------------------------------------------------------- names


AWKWARD = ["a:b/C_d", "a:b/C_d" * 20, "A", "a", "-x-", "x" * 63, "x" * 64, "", "é/ü:ß", "wove-ok"]


def test_dns_names_from_awkward_keys_are_valid_and_distinct() -> None:
    names = [dns_label(f"wove-{key}") for key in AWKWARD]
    for key, name in zip(AWKWARD, names, strict=True):
        assert RFC1123.match(name) and len(name) <= 63, (key, name)
    assert len(set(names)) == len(names), "distinct keys must give distinct Job names"
    assert dns_label("wove-ok") == "wove-ok"  # a valid name stays readable
    for key in AWKWARD:
        value = label_value(key)
        assert LABEL.match(value) and len(value) <= 63, (key, value)
    # A requeued attempt gets its own Job; no key can collide with it.
    adapter = KubernetesJobsAdapter({"image": "x"}, environment="e")
    first = adapter.job_name(_spec("x-r2", attempt=1))
    second = adapter.job_name(_spec("x", attempt=2))
    assert first != second and RFC1123.match(second)


def _spec(key: str | None, attempt: int = 1, payload: str = "wove1.x") -> JobSpec:
    return JobSpec(run_id=f"t:{uuid.uuid4().hex}", task_id="t", attempt=attempt,
                   payload=payload, idempotency_key=key, job_name="wove-t-abc-1",
                   environment="k8s")


def test_awkward_key_round_trip_names_the_job_after_the_key(
    kube_cluster: KubeCluster, tmp_path: Path
) -> None:
    key = ("a:b/C_d" * 12) + uuid.uuid4().hex
    with hub_for(kube_cluster, config={"cleanup": False}, delivery_idempotency_key=key) as hub:
        future = hub.submit(tasks.record, str(tmp_path), "awk", 4)
        assert future.result(timeout=120) == 8
        job = job_of_run(kube_cluster, future.run_id)
    name = job["metadata"]["name"]
    assert RFC1123.match(name) and len(name) <= 63
    assert name == dns_label(f"wove-{key}")
    assert job["metadata"]["annotations"]["wove-adapters/idempotency-key"] == key
    kube_cluster.api("DELETE", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}"
                     "?propagationPolicy=Background")


# ---------------------------------------------------------------- 409 -> attach


def test_conflict_on_create_attaches_to_the_existing_job(kube_cluster: KubeCluster) -> None:
    """Two callers (two adapters), one key: the second create is 409 and attaches."""
    # An image that cannot be pulled: the Job exists but never runs during the test.
    config = kube_cluster.config(image="registry.invalid/wove:1")
    key = f"shared-{uuid.uuid4().hex[:8]}"

    async def two_callers() -> tuple[str, str, int, int]:
        first = KubernetesJobsAdapter(dict(config), environment="k8s")
        second = KubernetesJobsAdapter(dict(config), environment="k8s")
        await first.start()
        await second.start()
        try:
            one = await first.submit(_spec(key))
            two = await second.submit(_spec(key))
            state = await second.status(two)
            assert state in (JobState.PENDING, JobState.RUNNING)
            await first.cancel(one)
            return one, two, first.submissions, second.submissions
        finally:
            await first.aclose()
            await second.aclose()

    one, two, created_first, created_second = shared_loop.run_sync(two_callers())
    assert one == two == f"{NAMESPACE}/{dns_label('wove-' + key)}"
    assert (created_first, created_second) == (1, 0)


def test_same_key_in_one_process_is_one_job(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    key = f"one-{uuid.uuid4().hex[:8]}"
    with hub_for(kube_cluster, delivery_idempotency_key=key) as hub:
        adapter = adapter_of(hub)
        before = adapter.submissions
        futures = [hub.submit(tasks.record, str(tmp_path), "k", 3) for _ in range(3)]
        assert [f.result(timeout=120) for f in futures] == [6, 6, 6]
        assert adapter.submissions - before == 1
    assert len((tmp_path / "k.runs").read_text().splitlines()) == 1


# ---------------------------------------------------------------- cancel / delete


def test_cancel_deletes_the_job_and_its_pods(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    # The ack window is the confirmation bound, not what is tested: 10 s (the default)
    # ran out once while the emulator shared two loaded cores with the fault suite.
    with hub_for(kube_cluster, config={"cancel_ack_timeout": 30.0},
                 delivery_cancel_mode="require_ack") as hub:
        future = hub.submit(tasks.sleepy, str(tmp_path), "victim", 60.0)
        pid = int(wait_for_file(tmp_path / "victim.started", 90))
        job = job_of_run(kube_cluster, future.run_id)
        name = job["metadata"]["name"]
        assert kube_cluster.pods(selector=f"job-name={name}"), "the Job should have a Pod"
        hub.cancel(future, mode="require_ack")
        with pytest.raises(Cancelled):
            future.result(timeout=60)
    # Background propagation: the Job is gone at once, its Pods follow (the emulator,
    # like the API server, orphans Pods when no propagationPolicy is given).
    status, _ = kube_cluster.api("GET", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}")
    assert status == 404
    wait_until(lambda: not kube_cluster.pods(selector=f"job-name={name}"), 60, "Pods deleted")
    wait_until(lambda: not pid_alive(pid), 30, "worker process gone")
    assert not (tmp_path / "victim.finished").exists()


def test_cancel_one_index_of_an_indexed_job(kube_cluster: KubeCluster, tmp_path: Path) -> None:
    with hub_for(kube_cluster, config=BATCH) as hub:
        adapter = adapter_of(hub)
        before = adapter.submissions
        futures = [hub.submit(tasks.sleepy, str(tmp_path), f"ix{i}", 3.0) for i in range(3)]
        wait_for_file(tmp_path / "ix1.started", 90)
        hub.cancel(futures[1])
        with pytest.raises(Cancelled):
            futures[1].result(timeout=60)
        assert futures[0].result(timeout=120) == "ix0"
        assert futures[2].result(timeout=120) == "ix2"
        assert adapter.submissions - before == 1, "three quick submissions are one Indexed Job"
    time.sleep(3.5)
    assert not (tmp_path / "ix1.finished").exists()


# ---------------------------------------------------------------- waiting


def test_a_run_waiting_for_capacity_is_reported_in_the_schedulers_words(
    kube_cluster: KubeCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The node's slots are full: the next run's Pod is Unschedulable. The "has not
    # started" warning quotes the scheduler instead of a bare "pending".
    caplog.set_level("WARNING", logger="wove_adapters.runtime")
    with hub_for(kube_cluster, config={"pending_warning_seconds": 1.0}) as hub:
        blockers = [hub.submit(tasks.sleepy, str(tmp_path), f"full{i}", 8.0)
                    for i in range(CAPACITY)]
        for i in range(CAPACITY):
            wait_for_file(tmp_path / f"full{i}.started", 90)
        waiting = hub.submit(tasks.add, 1)
        wait_until(lambda: any(waiting.run_id in r.getMessage() for r in caplog.records),
                   30, "a warning about the waiting run")
        assert waiting.result(timeout=120) == 2
        assert [b.result(timeout=120) for b in blockers] == [f"full{i}" for i in range(CAPACITY)]
    lines = [r.getMessage() for r in caplog.records if waiting.run_id in r.getMessage()]
    assert lines and "backend state: pending (pod " in lines[0], lines
    assert "Unschedulable: 0/1 nodes are available: 1 Insufficient pods." in lines[0], lines


# ---------------------------------------------------------------- lost runs


def test_command_not_found_is_a_lost_run(kube_cluster: KubeCluster) -> None:
    config = {"python": "/nonexistent/bin/python3"}
    with hub_for(kube_cluster, config=config, delivery_orphan_policy="fail") as hub:
        future = hub.submit(tasks.add, 1)
        with pytest.raises(DeliveryOrphanedError, match="without a terminal event"):
            future.result(timeout=120)


def test_pod_that_never_starts_is_a_lost_run(kube_cluster: KubeCluster) -> None:
    config = {"image": "registry.invalid/wove:missing", "pending_timeout": 1.0}
    with hub_for(kube_cluster, config=config, delivery_orphan_policy="fail") as hub:
        future = hub.submit(tasks.add, 1)
        job = job_of_run(kube_cluster, future.run_id)
        with pytest.raises(DeliveryOrphanedError, match="failed without a terminal event"):
            future.result(timeout=120)
    name = job["metadata"]["name"]
    # The orphan policy cancelled the stuck Job: it and its Pod are gone.
    wait_until(lambda: kube_cluster.api(
        "GET", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}")[0] == 404, 60, "Job gone")
    wait_until(lambda: not kube_cluster.pods(selector=f"job-name={name}"), 60, "Pod gone")


@pytest.mark.parametrize("policy", ["fail", "cancel", "requeue"])
def test_a_job_that_dies_without_an_event_gets_its_orphan_policy(
    kube_cluster: KubeCluster, tmp_path: Path, policy: str
) -> None:
    # No heartbeats: only reconciliation (the Job's Failed condition) can notice.
    with hub_for(kube_cluster, delivery_orphan_policy=policy) as hub:
        future = hub.submit(tasks.die_once, str(tmp_path), "doomed")
        pid = int(wait_for_file(tmp_path / "doomed.pid", 90))
        os.kill(pid, signal.SIGKILL)
        if policy == "fail":
            with pytest.raises(DeliveryOrphanedError, match="failed without a terminal event"):
                future.result(timeout=120)
        elif policy == "cancel":
            with pytest.raises(Cancelled):
                future.result(timeout=120)
        else:
            assert future.result(timeout=180) == "doomed-done"
            assert len((tmp_path / "doomed.attempts").read_text().splitlines()) == 2


def test_state_map() -> None:
    def job(**status: Any) -> dict[str, Any]:
        return {"metadata": {"name": "j"}, "status": status}

    def cond(kind: str) -> list[dict[str, str]]:
        return [{"type": kind, "status": "True"}]

    cases = {
        native_state(None): JobState.GONE,
        native_state(job()): JobState.PENDING,
        native_state(job(active=1)): JobState.PENDING,
        native_state(job(active=1, ready=1)): JobState.RUNNING,
        native_state(job(conditions=cond("Complete"))): JobState.SUCCEEDED,
        native_state(job(conditions=cond("Failed"))): JobState.FAILED,
        native_state(job(conditions=cond("FailureTarget"))): JobState.FAILED,
        native_state(job(conditions=cond("Suspended"))): JobState.PENDING,
        native_state(job(completedIndexes="0-2,5"), 5): JobState.SUCCEEDED,
        native_state(job(failedIndexes="1,3"), 3): JobState.FAILED,
        native_state(job(completedIndexes="0", active=2), 1): JobState.RUNNING,
        native_state(job(completedIndexes="0", conditions=cond("Failed")), 1): JobState.FAILED,
    }
    for state, expected in cases.items():
        assert KubernetesJobsAdapter.map_state(state) is expected, state
    assert KubernetesJobsAdapter.map_state("SOMETHING_NEW") is JobState.UNKNOWN


def test_only_the_workers_exit_code_2_is_a_refusal() -> None:
    def pod(code: int, container: str = "wove-worker") -> dict[str, Any]:
        state = {"terminated": {"exitCode": code, "reason": "Error"}}
        return {"status": {"phase": "Failed",
                           "containerStatuses": [{"name": container, "state": state}]}}

    assert refused(pod(2))
    assert not refused(pod(1)), "a task that raised is not a refusal"
    assert not refused(pod(3)), "an undeliverable outcome is not a refusal"
    assert not refused(pod(2, container="sidecar"))
    assert not refused({"status": {"phase": "Pending"}})


def test_a_refused_indexed_job_fails_each_run_naming_the_key(kube_cluster: KubeCluster) -> None:
    """Pods that do not hold the signing key refuse every index (exit 2, nothing signed or
    sent): each mapped run fails with a PayloadError naming the key, and none is
    requeued."""
    config = {"secret": f"unheld-{uuid.uuid4().hex}", **BATCH}
    with hub_for(kube_cluster, "refusing", config=config,
                 delivery_orphan_policy="requeue") as hub:
        futures = [hub.submit(tasks.add, i) for i in range(3)]
        key_id = hub.dispatcher("refusing").key_id
        for future in futures:
            with pytest.raises(PayloadError, match=re.escape(key_id)):
                future.result(timeout=120)
        shared_loop.run_sync(hub.dispatcher("refusing").flush())
        for future in futures:
            record = shared_loop.run_sync(hub.dispatcher("refusing").ledger.get(future.run_id))
            assert record is not None and record.attempt == 1, "a refused payload was requeued"
        assert adapter_of(hub, "refusing").submissions == 1, "the three runs were one Indexed Job"


# ---------------------------------------------------------------- mapped tasks


def test_a_failing_item_does_not_stop_its_indexed_job(kube_cluster: KubeCluster) -> None:
    with hub_for(kube_cluster, config=BATCH) as hub:
        futures = [hub.submit(fail_on_three, i) for i in range(6)]
        for i, future in enumerate(futures):
            if i == 3:
                with pytest.raises(tasks.ConformanceError, match="item 3 is broken"):
                    future.result(timeout=180)
            else:
                assert future.result(timeout=180) == i * 10


def test_a_mapped_task_is_one_indexed_job(kube_cluster: KubeCluster) -> None:
    with hub_for(kube_cluster, config={"cleanup": False, **BATCH}) as hub:
        transport = hub.dispatcher("k8s").transport
        adapter = adapter_of(hub)
        before = adapter.submissions
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100)) == [i + 1 for i in range(100)]
        indexed_seconds = time.perf_counter() - start
        indexed_jobs = adapter.submissions - before
        assert indexed_jobs == 1, "100 items should be one Indexed Job"
        assert transport.stats["array_submissions"] >= 1  # type: ignore[attr-defined]
    def indexed_jobs_seen() -> list[dict[str, Any]]:
        return [j for j in kube_cluster.jobs() if j["spec"].get("completions") == 100]

    # Results come back before the Pods exit; the Job's status follows.
    wait_until(lambda: any(j["status"].get("completedIndexes") == "0-99"
                           for j in indexed_jobs_seen()), 60, "Indexed Job complete")
    indexed = indexed_jobs_seen()
    assert indexed[-1]["spec"]["completionMode"] == "Indexed"
    for job in indexed:
        kube_cluster.api("DELETE", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/"
                         f"{job['metadata']['name']}?propagationPolicy=Background")
    # The same 100 items as 100 separate Jobs (a key per item turns batching off).
    prefix = uuid.uuid4().hex[:8]
    with hub_for(kube_cluster, "single", delivery_idempotency_key=prefix + "-{x}") as hub:
        adapter = adapter_of(hub, "single")
        start = time.perf_counter()
        assert hub.map(tasks.add, range(100)) == [i + 1 for i in range(100)]
        single_seconds = time.perf_counter() - start
        singles = adapter.submissions
    assert singles == 100
    print(f"\nkubernetes 100 items: Indexed Job {indexed_jobs} submission {indexed_seconds:.2f}s; "
          f"separate Jobs {singles} submissions {single_seconds:.2f}s")


# ---------------------------------------------------------------- options, secret, doctor


def test_options_reach_the_job(kube_cluster: KubeCluster) -> None:
    config = {
        "namespace": "default", "cleanup": False, "service_account": "wove-runner",
        "image_pull_secrets": ["regcred"], "cpu": "250m", "memory": "256Mi",
        "ttl_seconds_after_finished": 120, "active_deadline_seconds": 600,
        "labels": {"team": "data"}, "annotations": {"example.com/owner": "me"},
        "node_selector": {"kubernetes.io/os": "linux"}, "priority_class_name": "batch-low",
        "image_pull_policy": "IfNotPresent", "task_options": {"labels": {"team": "ml"}},
    }
    with hub_for(kube_cluster, "opts", config=config) as hub:
        future = hub.submit(tasks.add, 2)
        assert future.result(timeout=120) == 3
    job = job_of_run(kube_cluster, future.run_id, namespace="default")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert spec["backoffLimit"] == 0 and spec["ttlSecondsAfterFinished"] == 120
    assert spec["activeDeadlineSeconds"] == 600
    assert pod["serviceAccountName"] == "wove-runner"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["priorityClassName"] == "batch-low"
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "256Mi"},
                                      "limits": {"memory": "256Mi"}}
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert job["metadata"]["labels"]["team"] == "ml"  # task_options win
    assert job["metadata"]["annotations"]["example.com/owner"] == "me"
    # Only a reference travels in the Pod spec; the payload is in the store.
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WOVE_PAYLOAD_REF"].startswith("file://") and len(env["WOVE_PAYLOAD_REF"]) < 300
    assert container["args"] == ["--payload-ref", "$(WOVE_PAYLOAD_REF)"]
    kube_cluster.api("DELETE", f"/apis/batch/v1/namespaces/default/jobs/"
                     f"{job['metadata']['name']}?propagationPolicy=Background")


def test_signing_secret_reaches_the_pod_through_a_kubernetes_secret(
    kube_cluster: KubeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real deployment: the caller has ``secret: env:VAR``; the Pods read the same key
    from a Kubernetes Secret (``secret_ref``), not from a shared data directory."""
    secret = uuid.uuid4().hex + uuid.uuid4().hex
    name = f"wove-secret-{uuid.uuid4().hex[:6]}"
    monkeypatch.setenv("WOVE_K8S_TEST_SECRET", secret)
    status, body = kube_cluster.api("POST", f"/api/v1/namespaces/{NAMESPACE}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
        "data": {"secret": base64.b64encode(secret.encode()).decode()}})
    assert status == 201, body
    empty_home = tmp_path / "pod-home"
    empty_home.mkdir()
    config = {"secret": "env:WOVE_K8S_TEST_SECRET", "secret_ref": {"name": name, "key": "secret"},
              "env": {"WOVE_ADAPTERS_HOME": str(empty_home)}}
    with hub_for(kube_cluster, "secret", config=config) as hub:
        assert hub.run(tasks.add, 20) == 21


def test_doctor_rows(kube_cluster: KubeCluster) -> None:
    async def rows(config: dict[str, Any]) -> list[tuple[str, bool, str]]:
        adapter = KubernetesJobsAdapter(config, environment="k8s")
        try:
            return await adapter.doctor()
        finally:
            await adapter.aclose()

    good = shared_loop.run_sync(rows(kube_cluster.config()))
    assert [ok for _, ok, _ in good] == [True] * len(good), good
    assert any("RBAC" in what for what, _, _ in good)
    # No create permission in this namespace: the dry run says so, with what to grant.
    readonly = shared_loop.run_sync(rows(kube_cluster.config(namespace="wove-readonly")))
    rbac = next(row for row in readonly if row[0].startswith("RBAC: can create"))
    assert rbac[1] is False and "403" in rbac[2] and "grant create" in rbac[2]
    missing = shared_loop.run_sync(rows(kube_cluster.config(namespace="no-such-ns")))
    ns_row = next(row for row in missing if row[0].startswith("namespace"))
    assert ns_row[1] is False and "kubectl create namespace no-such-ns" in ns_row[2]
    # The API itself unreachable: one failing row that says what to check.
    unreachable = shared_loop.run_sync(rows({
        "host": "http://127.0.0.1:9", "image": "x", "request_timeout": 5}))
    assert unreachable[0][1] is False and "host" in unreachable[0][2]


def test_explicit_host_and_token(kube_cluster: KubeCluster) -> None:
    config = kube_cluster.config(host=kube_cluster.url, token=kube_cluster.token,
                                 namespace=NAMESPACE)
    del config["kubeconfig"]
    definition = {"executor": "kubernetes_jobs", "executor_config": config}
    with Hub(environments={"host": definition}, default_environment="host") as hub:
        assert hub.run(tasks.add, 5) == 6
    bad = dict(config, token="wrong")
    with Hub(environments={"bad": {"executor": "kubernetes_jobs", "executor_config": bad}},
             default_environment="bad") as hub, pytest.raises(Exception, match="401"):
        hub.run(tasks.add, 5)


def test_image_is_required(kube_cluster: KubeCluster) -> None:
    config = kube_cluster.config()
    del config["image"]
    definition = {"executor": "kubernetes_jobs", "executor_config": config}
    with Hub(environments={"noimage": definition}, default_environment="noimage") as hub:
        with pytest.raises(ValueError, match="needs executor_config 'image'"):
            hub.run(tasks.add, 1)
