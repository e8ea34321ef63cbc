"""Session fixture: a real Dask cluster started with Dask's own CLI (see
``dask_cluster_helpers``), stopped by process group at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from dask_cluster_helpers import DaskCluster, start_cluster


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    yield from start_cluster(tmp_path_factory.mktemp("dask-cluster"))
