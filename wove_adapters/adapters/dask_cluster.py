"""The Dask adapter's cluster plumbing: which scheduler ``executor_config`` names, the
``Client`` and the ``LocalCluster`` it owns (started, and stopped quietly in order), the
``doctor`` rows, and the scheduler-side functions it runs.
Kept apart from ``dask.py`` (the adapter's job talk), like ``kubernetes_manifest.py``.
The scheduler imports this module by name for ``run_on_scheduler``: it must not import
dask or distributed at import time either."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from wove_adapters.core.doctor import Row, checked_row
from wove_adapters.worker import hosted

if TYPE_CHECKING:
    from wove_adapters.adapters.dask import DaskOptions

log = logging.getLogger("wove_adapters.adapters.dask")


async def connect(options: DaskOptions, environment: str) -> tuple[Any, Any]:
    """(client, the LocalCluster the environment owns or None) for ``executor_config``;
    a ConnectionError naming how to start a scheduler when none answers."""
    from distributed import Client, LocalCluster

    address = configured_address(options)
    cluster = None
    if options.cluster == "local":
        cluster = await LocalCluster(**local_cluster_options(options))
        address = cluster.scheduler_address
    target, kwargs = client_arguments(options, environment, address, local=cluster is not None)
    try:
        client = await Client(target, **kwargs)
    except Exception as exc:
        await close(None, cluster)
        raise ConnectionError(
            f"cannot reach the Dask scheduler at {address}: {exc}. Start one with "
            f"'dask scheduler --host 127.0.0.1' and workers with 'dask worker {address}', "
            f"or use executor_config cluster: 'local'."
        ) from exc
    if options.allowed_failures is not None and cluster is None:
        await client.run_on_scheduler(set_allowed_failures, allowed=options.allowed_failures)
    return client, cluster


async def close(client: Any, cluster: Any) -> None:
    """The client first (releasing every key, so no worker holds data or runs our work
    when it is told to stop), then the LocalCluster we own; closing always goes on."""
    with quiet_dask_logs():
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if cluster is not None:
            try:
                await cluster.close()
            except Exception:
                log.warning("closing the Dask LocalCluster failed", exc_info=True)


async def doctor_rows(client: Any) -> list[Row]:
    if client is None:
        return [("dask scheduler reachable", False, "the adapter is not started")]
    address = client.scheduler.address
    rows: list[Row] = [("dask scheduler reachable", True, str(address))]
    workers = (await client.scheduler.identity()).get("workers", {})
    threads = sum(int(w.get("nthreads", 0)) for w in workers.values())
    rows.append(("dask workers connected", bool(workers),
                 f"{len(workers)} workers, {threads} threads" if workers else
                 f"no workers: start one with 'dask worker {address}'"))
    if workers:
        rows.append(await checked_row(
            "workers import wove_adapters", client.run(hosted.worker_ready),
            lambda versions: f"{len(versions)} workers",
            lambda exc: f"{exc}: pip install 'wove-adapters[dask]' on every worker"))
    failures = await client.run_on_scheduler(allowed_failures)
    rows.append((
        "scheduler allowed-failures is 0", failures == 0,
        "a dead worker fails the task, so the orphan policy applies" if failures == 0 else
        f"allowed-failures={failures}: Dask re-runs a task whose worker died (at least "
        f"once) before wove-adapters sees a loss; set "
        f"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 on the scheduler or "
        f"executor_config allowed_failures: 0",
    ))
    return rows


def configured_address(options: DaskOptions) -> str | None:
    """The scheduler ``executor_config`` names; a ValueError when it names none."""
    address = options.address or options.scheduler_file
    cluster = options.cluster
    if cluster not in (None, "local"):
        raise ValueError(f"dask executor_config 'cluster' must be 'local', not {cluster!r}")
    if not address and cluster is None:
        raise ValueError(
            "dask executor_config needs 'address' (e.g. 'tcp://127.0.0.1:8786'), "
            "'scheduler_file', or cluster: 'local' to start a LocalCluster"
        )
    return address or None


def client_arguments(
    options: DaskOptions, environment: str, address: str | None, *, local: bool
) -> tuple[str | None, dict[str, Any]]:
    """(address, keyword arguments) of the asynchronous ``Client`` to the scheduler."""
    # Same host as an owned cluster: fetch results from the workers, not the scheduler.
    defaults: dict[str, Any] = {"direct_to_workers": True} if local else {}
    kwargs: dict[str, Any] = {"timeout": options.connect_timeout,
                              "name": f"wove-adapters-{environment}",
                              **defaults, **options.client_options, "asynchronous": True}
    if options.scheduler_file and not options.address:
        kwargs["scheduler_file"] = options.scheduler_file
        return None, kwargs
    return address, kwargs


def local_cluster_options(options: DaskOptions) -> dict[str, Any]:
    """``LocalCluster`` arguments for the cluster the environment owns."""
    arguments: dict[str, Any] = {
        "host": "127.0.0.1",
        "protocol": "tcp://",
        "n_workers": options.n_workers,
        "threads_per_worker": options.threads_per_worker,
        "processes": True,
        # The scheduler always serves HTTP (health, metrics); with None it takes 8787.
        # Loopback and a free port instead ('--no-dashboard' would bind 0.0.0.0).
        "dashboard_address": "127.0.0.1:0",
        # A worker that dies mid-task fails the task (KilledWorker) instead of Dask
        # re-running it: the orphan policy decides what happens to a lost run.
        "scheduler_kwargs": {"allowed_failures": options.allowed_failures or 0},
        # The cluster is ours and stops with us: its workers' expected goodbyes at
        # close (a cancelled task interrupted, comms closed, on a loaded machine a
        # heartbeat that raced the scheduler's close, logged as ERROR) are not news
        # for the user's terminal. What matters reaches the caller as run outcomes
        # (task errors, KilledWorker); cluster_options={"silence_logs": ...} overrides.
        "silence_logs": logging.CRITICAL,
        "asynchronous": True,
    }
    return {**arguments, **options.cluster_options}


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
