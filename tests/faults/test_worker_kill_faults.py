"""kill -9 of workers under ``requeue`` + heartbeats: first single worker children in the
middle of a task, then the whole worker at once (and, where a worker is a service, a
restart as an operator would do). Every run gives exactly one correct result; a run
executes once, plus once for each execution a kill cut short (the documented
at-least-once of ``requeue``), never more.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fault_tasks
import faults

RUNS = 16
TASK_SECONDS = 0.5
HEARTBEAT = 2.0
CHILD_KILLS = 2
FRESH = 0.02  # seconds after a task's start: the whole worker dies before task_started
RESULT_BOUND = 60.0  # seconds for every run to resolve after the kills

Kill = Callable[[], None]


def _requeue(definition: dict[str, Any]) -> dict[str, Any]:
    return {**definition, "delivery_orphan_policy": "requeue",
            "delivery_heartbeat_seconds": HEARTBEAT}


def _kill_children_then_whole(markers: Path, kill_child: Callable[[int], None],
                              kill_whole: Kill) -> None:
    """SIGKILL ``CHILD_KILLS`` processes each in the middle of a task (one at a time, each
    after it was seen running), then the whole worker within ``FRESH`` seconds of a task's
    start: before that task's ``task_started`` event (workers send it after 50 ms, so a
    short task costs one request), the hardest moment to notice the loss."""
    for _ in range(CHILD_KILLS):
        _tag, pid = wait_running(markers)
        kill_child(pid)
        faults.wait_until(lambda pid=pid: not faults.alive(pid), 10, f"pid {pid} to die")
    wait_running(markers, fresh=FRESH)
    kill_whole()


def wait_running(markers: Path, fresh: float | None = None) -> tuple[str, int]:
    """A tag executing now and its pid; with ``fresh``, one that started at most ``fresh``
    seconds ago."""
    def found() -> dict[str, int]:
        now = time.monotonic()
        tags = faults.running(markers)
        if fresh is not None:
            recent = {m.tag for m in faults.read_marks(markers)
                      if m.event == "start" and now - m.at <= fresh}
            tags = {tag: pid for tag, pid in tags.items() if tag in recent}
        return tags

    running = faults.wait_until(found, 60, "a task to be running", interval=0.005)
    return next(iter(running.items()))


def _scenario(name: str, hub: Any, markers: Path, kill_child: Callable[[int], None],
              kill_whole: Kill, *, runs: int = RUNS) -> None:
    started = time.monotonic()
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(runs)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, TASK_SECONDS)
               for tag in tags}
    _kill_children_then_whole(markers, kill_child, kill_whole)
    counts = faults.Counts(name)
    faults.count_futures(counts, futures, {tag: fault_tasks.expected(tag) for tag in tags},
                         timeout=RESULT_BOUND)
    faults.count_executions(counts, markers, tags, allowed=faults.allowed_after_kills(markers))
    assert faults.unfinished(markers), "no execution was killed: the scenario injected nothing"
    faults.check(counts, started)


def test_stdio_worker_kill(hub_for: Callable[..., Any], markers: Path) -> None:
    hub = hub_for(_requeue({"executor": "stdio",
                            "executor_config": {"processes": 2, "env": faults.task_env()}}))
    hub.run(fault_tasks.work, str(markers), "warm-up")  # the pool is up before the clock

    def kill_pool() -> None:  # every stdio worker process at once; the pool replaces them
        for pid in faults.processes_running("wove_adapters.stdio_worker", under=os.getpid()):
            faults.kill(pid)

    _scenario("worker kill -9: stdio", hub, markers, faults.kill, kill_pool)


def test_process_worker_kill(hub_for: Callable[..., Any], markers: Path) -> None:
    hub = hub_for(_requeue({"executor": "process",
                            "executor_config": {"env": faults.task_env()},
                            "delivery_max_in_flight": 4}))

    def kill_all() -> None:  # every worker process running a task, at once
        for pid in faults.running(markers).values():
            faults.kill(pid)

    _scenario("worker kill -9: process", hub, markers, faults.kill, kill_all)


def test_rq_worker_kill_and_restart(hub_for: Callable[..., Any], markers: Path,
                                    private_redis: Callable[..., faults.RedisServer],
                                    rq_worker: Callable[..., faults.RqWorkerProcess]) -> None:
    broker = private_redis()
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    workers = [rq_worker(broker.url(), queue), rq_worker(broker.url(), queue)]
    hub = hub_for(_requeue({"executor": "rq",
                            "executor_config": {"redis_url": broker.url(), "queue": queue}}))

    def kill_whole_and_restart() -> None:
        # The work-horses leave the worker's process group: kill them by parent PID.
        for worker in workers:
            worker.kill()
        workers.append(rq_worker(broker.url(), queue))

    # The child is the work-horse running the task (the pid the task reported); its
    # worker survives and marks the job failed.
    _scenario("worker kill -9: rq (horse, whole worker, restart)", hub, markers, faults.kill,
              kill_whole_and_restart)


def test_dask_worker_kill_and_restart(hub_for: Callable[..., Any], markers: Path,
                                      dask_cluster: faults.DaskCluster) -> None:
    hub = hub_for(_requeue({"executor": "dask",
                            "executor_config": {"address": dask_cluster.address}}))
    hub.run(fault_tasks.work, str(markers), "warm-up")

    def kill_whole_and_restart() -> None:
        dask_cluster.kill_workers()
        dask_cluster.start_workers(2)

    # A worker process killed under its nanny is restarted by the nanny.
    _scenario("worker kill -9: dask (worker process, whole worker, restart)", hub, markers,
              faults.kill, kill_whole_and_restart)

