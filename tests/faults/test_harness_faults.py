"""The harness itself: a fault test is only as good as the faults it really injects."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import fault_tasks
import faults


def test_private_redis_restarts_with_and_without_aof(
        private_redis: Callable[..., faults.RedisServer]) -> None:
    import redis

    for aof, kept in ((False, None), (True, b"1")):
        server = private_redis(aof=aof)
        client = redis.Redis.from_url(server.url())
        client.set("k", "1")
        server.kill()
        assert not server.ping()
        server.start()
        assert client.get("k") == kept, f"aof={aof}"
        client.close()


def test_caller_pause_resume_kill_and_marks(
        caller: Callable[..., faults.Caller], markers: Path) -> None:
    program = caller("""
emit(kind="ready", pid=os.getpid())
for i in range(1000):
    emit(kind="tick", tag=f"t{i}", value=fault_tasks.work(PARAMS["markers"], f"t{i}", 0.01))
""", {"markers": str(markers)}).start()
    program.wait_records("tick", 3, 30)
    program.pause()
    time.sleep(0.3)
    frozen = len(program.records("tick"))
    time.sleep(0.5)
    assert len(program.records("tick")) == frozen, "SIGSTOP did not stop the caller"
    program.resume()
    program.wait_records("tick", frozen + 3, 30)
    program.kill()
    ticks = program.records("tick")
    tags = [record["tag"] for record in ticks]
    counts = faults.count_records(faults.Counts("harness"), ticks,
                                  {tag: fault_tasks.expected(tag) for tag in tags})
    faults.count_executions(counts, markers, tags)
    assert counts.clean, counts
    assert faults.max_concurrent(markers) == 1
