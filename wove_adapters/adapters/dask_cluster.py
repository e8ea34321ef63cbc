"""The Dask adapter's cluster plumbing: which scheduler ``executor_config`` names, the
``Client`` and ``LocalCluster`` arguments, and the scheduler-side functions it runs.
Kept apart from ``dask.py`` (the adapter's job talk), like ``kubernetes_manifest.py``.
The scheduler imports this module by name for ``run_on_scheduler``: it must not import
dask or distributed at import time either."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any


def configured_address(config: dict[str, Any]) -> str | None:
    """The scheduler ``executor_config`` names; a ValueError when it names none."""
    address = config.get("address") or config.get("scheduler_file")
    cluster = config.get("cluster")
    if cluster not in (None, "local"):
        raise ValueError(f"dask executor_config 'cluster' must be 'local', not {cluster!r}")
    if not address and cluster is None:
        raise ValueError(
            "dask executor_config needs 'address' (e.g. 'tcp://127.0.0.1:8786'), "
            "'scheduler_file', or cluster: 'local' to start a LocalCluster"
        )
    return str(address) if address else None


def client_arguments(
    config: dict[str, Any], environment: str, address: str | None, *, local: bool
) -> tuple[str | None, dict[str, Any]]:
    """(address, keyword arguments) of the asynchronous ``Client`` to the scheduler."""
    # Same host as an owned cluster: fetch results from the workers, not the scheduler.
    defaults: dict[str, Any] = {"direct_to_workers": True} if local else {}
    kwargs: dict[str, Any] = {"timeout": float(config.get("connect_timeout", 30)),
                              "name": f"wove-adapters-{environment}",
                              **defaults, **(config.get("client_options") or {}),
                              "asynchronous": True}
    if config.get("scheduler_file") and not config.get("address"):
        kwargs["scheduler_file"] = config["scheduler_file"]
        return None, kwargs
    return address, kwargs


def local_cluster_options(config: dict[str, Any]) -> dict[str, Any]:
    """``LocalCluster`` arguments for the cluster the environment owns."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "protocol": "tcp://",
        "n_workers": int(config.get("n_workers", 2)),
        "threads_per_worker": int(config.get("threads_per_worker", 1)),
        "processes": True,
        # The scheduler always serves HTTP (health, metrics); with None it takes 8787.
        # Loopback and a free port instead ('--no-dashboard' would bind 0.0.0.0).
        "dashboard_address": "127.0.0.1:0",
        # A worker that dies mid-task fails the task (KilledWorker) instead of Dask
        # re-running it: the orphan policy decides what happens to a lost run.
        "scheduler_kwargs": {"allowed_failures": int(config.get("allowed_failures", 0))},
        # The cluster is ours and stops with us: its workers' expected goodbyes at
        # close (a cancelled task interrupted, comms closed, on a loaded machine a
        # heartbeat that raced the scheduler's close, logged as ERROR) are not news
        # for the user's terminal. What matters reaches the caller as run outcomes
        # (task errors, KilledWorker); cluster_options={"silence_logs": ...} overrides.
        "silence_logs": logging.CRITICAL,
        "asynchronous": True,
    }
    options.update(config.get("cluster_options") or {})
    return options


@contextlib.contextmanager
def quiet_dask_logs() -> Iterator[None]:
    """While we stop our own client and cluster, Dask's in-process loggers (scheduler,
    client, nanny, comms) report the expected goodbyes (closed comms, removed workers) as
    warnings and tracebacks; only real failures (CRITICAL) pass."""
    loggers = [logging.getLogger(name) for name in ("distributed", "tornado", "asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def allowed_failures(dask_scheduler: Any) -> int:
    return int(dask_scheduler.allowed_failures)


def set_allowed_failures(dask_scheduler: Any, allowed: int) -> int:
    dask_scheduler.allowed_failures = allowed
    return allowed
