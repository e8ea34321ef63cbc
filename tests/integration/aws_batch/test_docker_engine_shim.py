"""The Docker Engine API shim answers the ``docker`` package the way moto's batch backend
uses it: run detached, reload/status, logs with timestamps, wait, kill, stop, remove."""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest


@pytest.fixture
def docker_client(batch_stack: Any) -> Any:
    docker = pytest.importorskip("docker")
    client = docker.DockerClient(base_url=f"unix://{batch_stack.socket_path}", version="auto")
    yield client
    client.close()


def wait_exited(container: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            return
        time.sleep(0.05)
    raise AssertionError(f"container {container.name} still {container.status}")


def test_run_logs_and_exit_code(docker_client: Any) -> None:
    import docker

    container = docker_client.containers.run(
        image="python:3.11-slim",
        command=[sys.executable, "-c",
                 "import os, sys; print('out', os.environ['GREETING']); "
                 "print('err', file=sys.stderr); sys.exit(3)"],
        environment={"GREETING": "hello"}, detach=True, name=f"shim-test-{time.time_ns()}",
        log_config=docker.types.LogConfig(type=docker.types.LogConfig.types.JSON),
        extra_hosts={"host.docker.internal": "host-gateway"},
    )
    assert container.wait()["StatusCode"] == 3
    container.reload()
    assert container.status == "exited" and container.attrs["State"]["ExitCode"] == 3
    out = container.logs(stdout=True, stderr=False, timestamps=True, since=int(time.time()) - 60)
    stamp, _, line = out.decode().strip().partition(" ")
    assert line == "out hello" and stamp.endswith("Z")
    assert container.logs(stdout=False, stderr=True).decode().strip() == "err"
    container.remove()
    # The raw list: containers.list() inspects each container it lists, and moto may
    # remove one of its own job containers in between (404 on a container not ours).
    assert all(c["Id"] != container.id for c in docker_client.api.containers(all=True))


def test_kill_is_sigkill_and_stop_is_sigterm(docker_client: Any) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    killed = docker_client.containers.run(image="x", command=sleeper, detach=True)
    killed.reload()
    assert killed.status == "running"
    killed.kill()
    assert killed.wait()["StatusCode"] == 137
    stopped = docker_client.containers.run(image="x", command=sleeper, detach=True)
    stopped.stop(timeout=10)
    wait_exited(stopped)
    assert stopped.attrs["State"]["ExitCode"] == 143
    for container in (killed, stopped):
        container.remove()


def test_remove_running_needs_force(docker_client: Any) -> None:
    import docker

    container = docker_client.containers.run(
        image="x", command=[sys.executable, "-c", "import time; time.sleep(60)"], detach=True
    )
    with pytest.raises(docker.errors.APIError):
        container.remove()
    container.remove(force=True)


def test_images_and_unknown_command(docker_client: Any) -> None:
    import docker

    assert docker_client.images.pull("alpine", tag="3").tags == ["alpine:3"]
    assert docker_client.images.get("alpine:latest").tags == ["alpine:latest"]
    with pytest.raises(docker.errors.APIError):
        docker_client.containers.run(image="x", command=["/no/such/binary"], detach=True)
