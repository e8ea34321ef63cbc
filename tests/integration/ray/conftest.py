"""Session fixture: a real Ray cluster started with Ray's own CLI (``ray start --head``)
inside a loopback-only network namespace, with token authentication and this process's
Ray driver connected to it; stopped by PID at the end (see ``ray_cluster_helpers``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster_helpers import RayCluster, ray_cluster, use_session_token

# Before any test module can import ray (it reads RAY_AUTH_MODE at import).
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="wove-ray-auth-"))
use_session_token(_TOKEN_DIR)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    try:
        manager = ray_cluster(tmp_path_factory.mktemp("ray-cluster"))
        cluster = manager.__enter__()
    except RuntimeError as exc:
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)
        pytest.fail(f"could not start the Ray test cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        manager.__exit__(None, None, None)
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)
