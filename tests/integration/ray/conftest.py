"""Session fixture: a real Ray cluster started with Ray's own CLI (``ray start --head``)
inside a loopback-only network namespace (see ``ray_cluster_helpers``), with this
process's Ray driver connected to it; stopped by process group at the end."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from ray_cluster_helpers import RayCluster, ray_cluster


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    try:
        manager = ray_cluster(tmp_path_factory.mktemp("ray-cluster"))
        cluster = manager.__enter__()
    except RuntimeError as exc:
        pytest.fail(f"could not start the Ray test cluster: {exc}", pytrace=False)
    try:
        yield cluster
    finally:
        manager.__exit__(None, None, None)
