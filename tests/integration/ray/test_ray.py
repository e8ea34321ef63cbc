"""Ray-specific behaviour, against the real cluster of ``conftest.py``: a node started
with Ray's own CLI runs payloads with nothing registered, ``ray.remote`` options pass
through, no native dedupe (the ledger does it), status() for a run whose worker died,
and a local Ray owned by the environment (the weave and the missing-library hint are in
the conformance suite)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
from hubs import hub_factory
from ray_cluster_helpers import RayCluster, shared_loop_netns, start_node, wait_until

from wove_adapters.adapters.ray import RayAdapter
from wove_adapters.core import frames
from wove_adapters.core import loop as shared_loop
from wove_adapters.core.errors import DeliveryOrphanedError
from wove_adapters.core.policies import JobState
from wove_adapters.integration.hub import Hub
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import CancelledErrors, wait_for_file
from wove_adapters.testing.tasks import opens_on_unpickle

TIMEOUT = 60.0


@pytest.fixture
def hub() -> Iterator[Callable[..., Hub]]:
    """``hub(executor_config, **settings)``: a Hub on Ray, closed at teardown."""
    with hub_factory("ray") as make:
        yield lambda config, **settings: make(
            {"executor": "ray", "executor_config": config, **settings})


def adapter_of(hub: Hub) -> RayAdapter:
    adapter = hub.dispatcher("ray").transport.adapter  # type: ignore[attr-defined]
    assert isinstance(adapter, RayAdapter)
    return adapter


# ---------------------------------------------------------------- tasks (pickled by value)


def where_am_i() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "resources": context.get_assigned_resources(),
        "probe_env": os.environ.get("WOVE_PROBE"),
        "pid": os.getpid(),
    }


def spin(directory: str, tag: str, seconds: float) -> str:
    """Pure Python (no blocking call): Ray's cancel interrupt lands at once."""
    Path(directory, f"{tag}.started").write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    Path(directory, f"{tag}.finished").write_text(str(os.getpid()))
    return tag


def tampered(payload: str, returned: bool = False) -> Any:
    """``run_ray``, with one bit of the signed outcome it returns flipped (a writer of
    Ray's object store)."""
    from wove_adapters.worker import hosted

    value = hosted.run_ray(payload, returned)
    if isinstance(value, bytes):
        return value[:-8] + bytes([value[-8] ^ 1]) + value[-7:]
    return value


# ---------------------------------------------------------------- the cluster and its CLI


def test_everything_stays_on_loopback(ray_head: RayCluster, hub: Any) -> None:
    import ray

    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    made = hub({"address": ray_head.address})
    assert made.run(tasks.add, 1) == 2
    assert shared_loop_netns() == ray_head.netns
    receiver = made.dispatcher("ray").transport.receiver  # type: ignore[attr-defined]
    assert receiver.url.startswith("http://127.0.0.1:")
    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}


def test_a_node_started_with_the_ray_cli_runs_payloads(
    ray_head: RayCluster, hub: Any, tmp_path: Path
) -> None:
    """``ray start --address=HEAD`` is the whole worker side: nothing to register. The
    task asks for a resource only that node has, through ``task_options``."""
    import ray

    node = start_node(
        [f"--address={ray_head.address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         f"--resources={json.dumps({'wove_node2': 1})}"],
        tmp_path / "ray-node2.log",
    )
    try:
        wait_until("the second node joins",
                   lambda: ray.cluster_resources().get("wove_node2", 0) >= 1, node)
        node_id = next(n["NodeID"] for n in ray.nodes()
                       if n["Alive"] and "wove_node2" in n["Resources"])
        for return_path in ("http", "native"):
            made = hub({"address": ray_head.address, "return_path": return_path,
                        "task_options": {"resources": {"wove_node2": 1}}})
            where = made.run(where_am_i)
            assert where["node_id"] == node_id
            assert where["resources"]["wove_node2"] == 1
    finally:
        node.stop()


def test_remote_options_pass_through(ray_head: RayCluster, hub: Any) -> None:
    made = hub({
        "address": ray_head.address,
        "num_cpus": 0.5,
        "resources": {"wove_probe": 1},
        "runtime_env": {"env_vars": {"WOVE_PROBE": "from-runtime-env"}},
    })
    where = made.run(where_am_i)
    assert where["resources"] == {"CPU": 0.5, "wove_probe": 1.0}
    assert where["probe_env"] == "from-runtime-env"
    adapter = adapter_of(made)
    remote = adapter._remote
    assert made.map(tasks.add, range(5)) == [1, 2, 3, 4, 5]
    assert adapter._remote is remote, "the remote function is created once, not per submit"


def test_max_retries_passes_through(ray_head: RayCluster, hub: Any, tmp_path: Path) -> None:
    """With Ray's retries on, Ray re-runs a task whose worker died before we see a loss
    (the default, max_retries=0, leaves that to the orphan policy: see the suite)."""
    made = hub({"address": ray_head.address, "remote_options": {"max_retries": 1}},
               delivery_orphan_policy="fail")
    future = made.submit(tasks.die_once, str(tmp_path), "retried")
    os.kill(int(wait_for_file(tmp_path / "retried.pid", TIMEOUT)), signal.SIGKILL)
    assert future.result(timeout=TIMEOUT) == "retried-done"
    assert len((tmp_path / "retried.attempts").read_text().splitlines()) == 2


def test_bad_options_fail_at_start_and_submit(ray_head: RayCluster, hub: Any) -> None:
    with pytest.raises(ValueError, match="no_such_option"):
        hub({"address": ray_head.address, "remote_options": {"no_such_option": 1}}).run(
            tasks.add, 1)
    with pytest.raises(ValueError, match="no_such_option"):
        hub({"address": ray_head.address, "task_options": {"no_such_option": 1}}).run(
            tasks.add, 1)


def test_one_cluster_per_process(ray_head: RayCluster, hub: Any) -> None:
    with pytest.raises(RuntimeError, match="one cluster per process"):
        hub({"address": "127.0.0.1:1"}).run(tasks.add, 1)


def test_doctor(ray_head: RayCluster, hub: Any) -> None:
    made = hub({"address": ray_head.address})
    rows = shared_loop.run_sync(adapter_of(made).doctor(), TIMEOUT)
    assert [check for check, _, _ in rows] == [
        "ray cluster reachable", "ray nodes alive", "ray workers import wove_adapters",
        "ray max_retries is 0",
    ]
    assert all(ok for _, ok, _ in rows), rows


# ---------------------------------------------------------------- idempotency, status, cancel


def test_no_native_dedupe_the_ledger_does_it(
    ray_head: RayCluster, hub: Any, tmp_path: Path
) -> None:
    """Two environments (two dispatchers, one ledger) and one key: one execution."""
    assert RayAdapter.capabilities.native_idempotency is False
    key = f"ray-{uuid.uuid4().hex}"
    first = hub({"address": ray_head.address}, delivery_idempotency_key=key)
    second = hub({"address": ray_head.address, "return_path": "native"},
                 delivery_idempotency_key=key)
    futures = [first.submit(tasks.record, str(tmp_path), "once", 5),
               second.submit(tasks.record, str(tmp_path), "once", 5)]
    assert [f.result(timeout=TIMEOUT) for f in futures] == [10, 10]
    assert len((tmp_path / "once.runs").read_text().splitlines()) == 1


@pytest.mark.parametrize(("native", "state"), [
    ("PENDING_NODE_ASSIGNMENT", JobState.PENDING), ("RUNNING_IN_RAY_GET", JobState.RUNNING),
    ("FINISHED", JobState.SUCCEEDED), ("LOST", JobState.GONE),
    ("SOMETHING_NEW", JobState.UNKNOWN),
])
def test_state_map(native: str, state: JobState) -> None:
    assert RayAdapter.map_state(native) is state


@pytest.mark.parametrize("return_path", ["http", "native"])
def test_status_of_a_job_whose_worker_died_without_an_event(
    ray_head: RayCluster, hub: Any, tmp_path: Path, return_path: str
) -> None:
    """The loss event of the ObjectRef is withheld here, so only reconciliation (status()
    says the job is gone) can apply the orphan policy."""
    made = hub({"address": ray_head.address, "return_path": return_path,
                "reconcile_seconds": 0.5}, delivery_orphan_policy="fail")
    adapter = adapter_of(made)
    dispatcher = made.dispatcher("ray")
    forward = dispatcher._on_event
    adapter.emit = lambda frame: None if frame["type"] == frames.TASK_LOST else forward(frame)
    try:
        future = made.submit(tasks.die_once, str(tmp_path), "died")
        pid = int(wait_for_file(tmp_path / "died.pid", TIMEOUT))
        handle = dispatcher.runs[future.run_id].attempt.submission  # type: ignore[attr-defined]
        assert shared_loop.run_sync(adapter.status(handle)) is JobState.RUNNING
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(DeliveryOrphanedError, match="gone without a terminal event"):
            future.result(timeout=TIMEOUT)
        assert shared_loop.run_sync(adapter.status(handle)) is JobState.GONE
        finished = made.submit(tasks.add, 1)
        assert finished.result(timeout=TIMEOUT) == 2
    finally:
        adapter.emit = forward


@pytest.mark.parametrize("return_path", ["http", "native"])
def test_cancel_interrupts_python_code_without_killing_the_worker(
    ray_head: RayCluster, hub: Any, tmp_path: Path, return_path: str
) -> None:
    """``ray.cancel`` interrupts a task running Python code, which ends as cancelled
    (confirmed: ``require_ack``) while its worker lives on; force is only for tasks that
    ignore the interrupt (blocked in C code, as the suite's ``sleepy``)."""
    made = hub({"address": ray_head.address, "return_path": return_path,
                "force_cancel_after": 30}, delivery_cancel_mode="require_ack")
    future = made.submit(spin, str(tmp_path), "spin", 20.0)
    pid = int(wait_for_file(tmp_path / "spin.started", TIMEOUT))
    started = time.monotonic()
    made.cancel(future)
    assert time.monotonic() - started < 10
    with pytest.raises(CancelledErrors):
        future.result(timeout=TIMEOUT)
    os.kill(pid, 0)  # the worker process is still there
    assert not (tmp_path / "spin.finished").exists()


# ---------------------------------------------------------------- outcomes in the ObjectRef


def receiver_requests(made: Hub) -> int:
    """Event batches the caller's receiver accepted so far (shared: compare deltas)."""
    receiver = made.dispatcher("ray").transport.receiver  # type: ignore[attr-defined]
    return int(receiver.stats["accepted"])


def test_short_runs_return_their_outcome_in_the_object_ref(
    ray_head: RayCluster, hub: Any, tmp_path: Path
) -> None:
    """On the http path a run that ends within the short-task window posts nothing: its
    signed terminal event is the ObjectRef's value, checked like a POST. Results, task
    errors with their traceback, and a mapped burst all come that way; a run that
    outlives the window reports task_started and its end over HTTP as before."""
    made = hub({"address": ray_head.address})
    made.run(tasks.add, 0)  # the receiver's shared: count from here
    before = receiver_requests(made)
    assert [made.run(tasks.add, i) for i in range(5)] == [1, 2, 3, 4, 5]
    assert made.map(tasks.add, range(50), map_chunk_size=0) == list(range(1, 51))
    with pytest.raises(tasks.ConformanceError, match="boom") as raised:
        made.run(tasks.fail, "boom")
    assert "in fail" in str(raised.value.__cause__)  # the worker's traceback
    # 56 runs, each of which would post at least its end without the ObjectRef path. The
    # window is 50 ms: on a loaded machine (two suites on two cores) a run can outlive it
    # and post task_started and its end, as it should; at most three may.
    assert receiver_requests(made) - before <= 6
    assert made.run(tasks.sleepy, str(tmp_path), "long", 0.3) == "long"
    assert receiver_requests(made) >= before + 1  # task_started, then the result


def test_a_tampered_outcome_in_the_object_ref_is_never_unpickled(
    ray_head: RayCluster, hub: Any, tmp_path: Path
) -> None:
    """A returned outcome that fails its signature check is not routed and nothing in it
    is unpickled: the run is lost (its orphan policy applies), not resolved."""
    import ray

    made = hub({"address": ray_head.address}, delivery_orphan_policy="fail")
    adapter = adapter_of(made)
    marker = tmp_path / "unpickled"
    made.run(tasks.add, 0)
    honest = adapter._remote
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's own pickler
    try:
        adapter._remote = ray.remote(max_retries=0)(tampered)
        with pytest.raises(DeliveryOrphanedError, match="did not verify"):
            made.run(opens_on_unpickle, str(marker), delivery_timeout=TIMEOUT)
    finally:
        adapter._remote = honest
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not marker.exists()
    made.run(opens_on_unpickle, str(marker))  # the honest way: checked, then unpickled
    assert marker.exists()


# ---------------------------------------------------------------- local Ray


def run_script(script: str, **env: str) -> dict[str, Any]:
    """Run ``script`` in a fresh Python (Ray allows one cluster per process); it inherits
    this thread's loopback-only namespace. Returns the JSON of its last output line."""
    home = tempfile.mkdtemp(prefix="wove-ray-home-", dir="/tmp")  # short: Unix sockets
    environ = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": home, **env}
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
            timeout=300, env={k: v for k, v in environ.items() if v},
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_local_ray_started_by_the_environment(ray_head: RayCluster) -> None:
    """Without ``address`` the environment starts a local Ray in the calling process. A
    wrong address fails fast, with a hint, before that."""
    answer = run_script(f"""
        import json, os, ray
        from wove_adapters.integration.hub import Hub
        from wove_adapters.testing import tasks
        bad = Hub(environments={{"x": {{"executor": "ray",
                  "executor_config": {{"address": "127.0.0.1:{_closed_port()}"}}}}}},
                  default_environment="x")
        try:
            bad.run(tasks.add, 1)
        except ConnectionError as exc:
            error = str(exc)
        temp_dir = os.path.join(os.environ["HOME"], "r")
        hub = Hub(environments={{"x": {{"executor": "ray", "executor_config": {{
                  "init": {{"num_cpus": 1, "_temp_dir": temp_dir}}}}}}}}, default_environment="x")
        print(json.dumps({{"result": hub.run(tasks.add, 41), "error": error,
                          "cpus": ray.cluster_resources().get("CPU")}}))
    """)
    assert answer["result"] == 42
    assert answer["cpus"] == 1
    assert "ray start --head" in answer["error"]


def test_a_cluster_with_token_auth_needs_the_token(ray_head: RayCluster) -> None:
    """The test cluster uses token authentication (Ray's default for new clusters); a
    caller without the token is told what to export."""
    script = f"""
        import json
        from wove_adapters.integration.hub import Hub
        from wove_adapters.testing import tasks
        hub = Hub(environments={{"x": {{"executor": "ray",
                  "executor_config": {{"address": "{ray_head.address}"}}}}}},
                  default_environment="x")
        try:
            print(json.dumps({{"result": hub.run(tasks.add, 1)}}))
        except ConnectionError as exc:
            print(json.dumps({{"error": str(exc)}}))
    """
    assert run_script(script) == {"result": 2}
    # (Ray's own connect timeout shortened: it retries a refused token for ~20 s.)
    refused = run_script(script, RAY_AUTH_MODE="", RAY_AUTH_TOKEN_PATH="",
                         RAY_gcs_server_port_wait_time_s="2")
    assert "export RAY_AUTH_MODE=token" in refused["error"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
