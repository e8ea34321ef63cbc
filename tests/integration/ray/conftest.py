"""Session fixtures: every test here runs in a loopback-only network namespace, and
``ray_head`` is a real Ray cluster started there with Ray's own CLI (``ray start
--head``), with token authentication and this process's Ray driver connected; it is
stopped by PID at the end (see ``ray_cluster_helpers``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_cluster_helpers import (
    RayCluster,
    check_shared_loop,
    loopback_namespace,
    ray_cluster,
    use_session_token,
)

# Before any test module can import ray (it reads RAY_AUTH_MODE at import).
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="wove-ray-auth-"))
use_session_token(_TOKEN_DIR)


@pytest.fixture(scope="session", autouse=True)
def loopback_only() -> Iterator[str]:
    """Enter the namespace before any test starts the shared loop or a subprocess."""
    try:
        manager = loopback_namespace()
        netns = manager.__enter__()
        check_shared_loop(netns)
    except RuntimeError as exc:
        pytest.fail(f"could not isolate the Ray tests from the network: {exc}", pytrace=False)
    try:
        yield netns
    finally:
        manager.__exit__(None, None, None)
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(loopback_only: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    try:
        manager = ray_cluster(tmp_path_factory.mktemp("ray-cluster"))
        cluster = manager.__enter__()
    except RuntimeError as exc:
        pytest.fail(f"could not start the Ray test cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        manager.__exit__(None, None, None)
