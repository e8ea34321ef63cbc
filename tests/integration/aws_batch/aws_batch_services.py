"""Start and stop the local AWS Batch stand-in: moto in server mode on 127.0.0.1 whose
batch backend (docker mode) talks to ``docker_engine_shim.py`` on a unix socket, so every
job's container command really runs, as a local process. moto runs through
``moto_batch_server.py``, which puts a stopped job's exit code into DescribeJobs as AWS
Batch does.

Used by the test fixtures and by ``benchmarks/bench_aws_batch.py``:

    stack = start_stack(workdir)     # shim + moto_server + queue, definition, bucket
    stack.executor_config            # what the aws_batch adapter needs
    stop_stack(stack)                # SIGTERM by PID (the shim kills its containers)

Credentials are moto's dummies (``AWS_ACCESS_KEY_ID=testing`` ...), set in this process and
passed to both servers; job processes inherit the shim's environment, which plays the role
of the container image's ENV (and carries ``WOVE_ADAPTERS_HOME``, so a job finds the
caller's signing key).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))
from services import ServiceError, ServiceProcess, free_port  # noqa: E402

SHIM = HERE / "docker_engine_shim.py"
MOTO = HERE / "moto_batch_server.py"  # moto_server, DescribeJobs with exit codes as AWS has
REGION = "us-east-1"
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass
class BatchStack:
    workdir: Path
    socket_path: Path
    port: int
    shim: ServiceProcess
    moto: ServiceProcess
    names: dict[str, str] = field(default_factory=dict)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def store_url(self) -> str:
        return (
            f"s3://{self.names['bucket']}/payloads?endpoint_url={self.endpoint_url}"
            f"&region={REGION}"
        )

    @property
    def executor_config(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "region": REGION,
            "job_queue": self.names["queue"],
            "job_definition": self.names["definition"],
            "payload_store": self.store_url,
            "python": sys.executable,
        }

    def client(self, service: str) -> Any:
        import boto3

        return boto3.client(service, endpoint_url=self.endpoint_url, region_name=REGION)


def _ping_shim(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b"200" in sock.recv(256).split(b"\r\n", 1)[0]
    except OSError:
        return False


def _ping_moto(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=2):
            return True
    except OSError:
        return False


INSTALL_HINT = ("Install the test dependencies: "
                "pip install 'wove-adapters[aws]' 'moto[server,batch]' docker")


def start_stack(workdir: Path, *, max_running: int = 16, timeout: float = 60.0) -> BatchStack:
    """Start the shim and moto_server, then create a queue, a definition and a bucket.
    ``max_running`` caps the jobs running at once (the shim's stand-in for a compute
    environment's capacity; 0: no cap)."""
    for key, value in DUMMY_CREDENTIALS.items():
        os.environ[key] = value
    workdir.mkdir(parents=True, exist_ok=True)
    socket_path = workdir / "docker.sock"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WOVE_SHIM_WORKDIR": str(workdir)}
    shim = ServiceProcess(
        "the Docker Engine API shim",
        [sys.executable, str(SHIM), "--socket", str(socket_path),
         "--log-dir", str(workdir / "containers"), "--max-running", str(max_running)],
        log=workdir / "docker-shim.log", env=env, cwd=workdir,
        ready=lambda: _ping_shim(socket_path), ready_timeout=timeout, kill_group_after=False,
    )
    port = free_port()
    moto = ServiceProcess(
        "moto_server", [sys.executable, str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        log=workdir / "moto-server.log", env={**env, "DOCKER_HOST": f"unix://{socket_path}"},
        cwd=workdir, ready=lambda: _ping_moto(port), ready_timeout=timeout,
        kill_group_after=False,
    )
    try:
        shim.start()
        moto.start()
        stack = BatchStack(
            workdir=workdir, socket_path=socket_path, port=port, shim=shim, moto=moto
        )
        stack.names = create_resources(stack)
        return stack
    except ServiceError as exc:
        moto.stop()
        shim.stop()
        raise RuntimeError(f"{exc}\n{INSTALL_HINT}") from None
    except BaseException:
        moto.stop()
        shim.stop()
        raise


def create_resources(stack: BatchStack, tag: str | None = None) -> dict[str, str]:
    """An UNMANAGED compute environment, an ENABLED queue, a container job definition and a
    bucket, all named ``wove-test-aws-<uuid8>``."""
    tag = tag or f"wove-test-aws-{uuid.uuid4().hex[:8]}"
    iam, batch, s3 = stack.client("iam"), stack.client("batch"), stack.client("s3")
    role = iam.create_role(
        RoleName=f"{tag}-batch",
        AssumeRolePolicyDocument='{"Version": "2012-10-17", "Statement": []}',
    )["Role"]["Arn"]
    compute = batch.create_compute_environment(
        computeEnvironmentName=f"{tag}-ce", type="UNMANAGED", state="ENABLED", serviceRole=role
    )["computeEnvironmentArn"]
    batch.create_job_queue(
        jobQueueName=f"{tag}-queue", state="ENABLED", priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": compute}],
    )
    batch.register_job_definition(
        jobDefinitionName=f"{tag}-def", type="container",
        containerProperties={
            "image": "python:3.11-slim",  # ignored by the shim: the host's Python runs
            "command": ["python", "-c", "print('the adapter overrides this command')"],
            "resourceRequirements": [
                {"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "512"},
            ],
        },
    )
    s3.create_bucket(Bucket=tag)
    return {"queue": f"{tag}-queue", "definition": f"{tag}-def", "bucket": tag, "tag": tag}


def stop_stack(stack: BatchStack) -> None:
    """moto first (its job threads stop asking), then the shim, which kills its containers."""
    stack.moto.stop()
    stack.shim.stop()
