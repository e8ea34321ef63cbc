"""Session fixtures: every test here runs in a loopback-only network namespace, and
``ray_head`` is a real Ray cluster started there with Ray's own CLI (``ray start
--head``), with token authentication and this process's Ray driver connected; it is
stopped by PID at the end (see ``ray_cluster_helpers``)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import pytest
from ray_cluster_helpers import (
    RayCluster,
    check_shared_loop,
    loopback_namespace,
    ray_cluster,
    use_session_token,
)

T = TypeVar("T")

# Before any test module can import ray (it reads RAY_AUTH_MODE at import).
_TOKEN_DIR = Path(tempfile.mkdtemp(prefix="wove-ray-auth-"))
use_session_token(_TOKEN_DIR)


def _entered(manager: AbstractContextManager[T], failure: str,
             check: Callable[[T], None] = lambda _: None) -> Iterator[T]:
    """Yield what ``manager`` enters; a RuntimeError while entering (or from ``check``)
    fails the session's tests with ``failure`` and the reason, not a traceback."""
    try:
        value = manager.__enter__()
    except RuntimeError as exc:
        pytest.fail(f"{failure}: {exc}", pytrace=False)
    try:
        try:
            check(value)
        except RuntimeError as exc:
            pytest.fail(f"{failure}: {exc}", pytrace=False)
        yield value
    finally:
        manager.__exit__(None, None, None)


@pytest.fixture(scope="session", autouse=True)
def loopback_only() -> Iterator[str]:
    """Enter the namespace before any test starts the shared loop or a subprocess."""
    try:
        yield from _entered(loopback_namespace(),
                            "could not isolate the Ray tests from the network",
                            check_shared_loop)
    finally:
        shutil.rmtree(_TOKEN_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_head(loopback_only: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    yield from _entered(ray_cluster(tmp_path_factory.mktemp("ray-cluster")),
                        "could not start the Ray test cluster")
