"""AWS Batch stand-in for the session: moto in server mode on 127.0.0.1 whose batch backend
runs each job's container command as a local process through the Docker Engine API shim
(``docker_engine_shim.py``). Both are started by ``aws_batch_services.start_stack`` and
stopped by PID at the end; a failure to start fails the tests with what to install."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aws_batch_services as services


@pytest.fixture(scope="session")
def batch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.BatchStack]:
    # pytest keeps the last few of these (moto's and the shim's logs, one per job).
    workdir = tmp_path_factory.mktemp("aws-batch")
    try:
        stack = services.start_stack(workdir)
    except Exception as exc:
        pytest.fail(
            f"could not start moto_server + the Docker Engine API shim: {exc}\n"
            "The AWS Batch tests need: pip install 'wove-adapters[aws]' 'moto[server,batch]' docker"
        )
    yield stack
    services.stop_stack(stack)


@pytest.fixture
def batch_config(batch_stack: services.BatchStack) -> dict[str, object]:
    """A fresh copy of the adapter's executor_config for the session's stack."""
    return dict(batch_stack.executor_config)
