"""The cost per call of a task-control check (docs/task-controls.md), on each ledger.

For each ledger (SQLite file, the shared Redis, the shared PostgreSQL), one Hub on the
``stdio`` executor runs ``add(x)`` sequentially, distinct arguments each call (so no call
ever waits for another), alternating in blocks between the task without controls and the
same task with ``concurrency_control="arguments"`` (one lease taken before launch, renewed,
dropped after). The difference of the p50 latencies is what a control check costs a call;
the ratio is from one run in which both sides took turns.

Also the bare ledger round trip behind it: ``lease`` + ``drop_lease``, p50.

Prints one JSON line per ledger. Needs the shared Redis and PostgreSQL (127.0.0.1:6379,
127.0.0.1:5432); a missing one is reported in its line, not skipped silently.

    python benchmarks/bench_controls.py [--calls 200] [--block 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from wove_adapters import Hub
from wove_adapters.core.ledger import open_ledger
from wove_adapters.testing import tasks

REDIS = os.environ.get("WOVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES = os.environ.get("WOVE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _ledgers(tmp: Path, tag: str) -> dict[str, str]:
    return {
        "sqlite": f"sqlite:///{tmp / 'runs.db'}",
        "redis": f"{REDIS}?prefix=wove-bench-controls-{tag}:",
        "postgres": f"{POSTGRES}?table=wove_bench_controls_{tag}",
    }


def _p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


async def _lease_round_trip(url: str, n: int) -> float:
    ledger = open_ledger(url)
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await ledger.lease(f"bench|{i}", "run", 15.0)
        await ledger.drop_lease(f"bench|{i}", "run")
        samples.append(time.perf_counter() - start)
    await ledger.aclose()
    return _p50_ms(samples)


def measure(name: str, url: str, calls: int, block: int) -> dict[str, Any]:
    environment = {"executor": "stdio", "executor_config": {"processes": 1}}
    sides: dict[str, list[float]] = {"plain": [], "controlled": []}
    table = {"controlled": {"concurrency_control": "arguments"}}
    with Hub(environments={"e": environment}, default_environment="e", ledger=url,
             tasks=table) as hub:
        for side in sides:  # warm both paths
            hub.run(tasks.add, -1, task_options={"task_name": side})
        x = 0
        while len(sides["controlled"]) < calls:
            for side, samples in sides.items():
                for _ in range(block):
                    x += 1
                    start = time.perf_counter()
                    hub.run(tasks.add, x, task_options={"task_name": side})
                    samples.append(time.perf_counter() - start)
    plain, controlled = _p50_ms(sides["plain"]), _p50_ms(sides["controlled"])
    return {
        "kind": "controls", "ledger": name, "calls_per_side": calls,
        "plain_p50_ms": plain, "controlled_p50_ms": controlled,
        "check_cost_ms": round(controlled - plain, 3),
        "controlled_plain_p50": round(controlled / plain, 3),
        "lease_round_trip_p50_ms": asyncio.run(_lease_round_trip(url, 100)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--block", type=int, default=20)
    args = parser.parse_args(argv)
    tag = uuid.uuid4().hex[:8]
    with tempfile.TemporaryDirectory() as tmp:
        for name, url in _ledgers(Path(tmp), tag).items():
            try:
                line = measure(name, url, args.calls, args.block)
            except Exception as exc:  # a server that is not there: say so in the output
                line = {"kind": "controls", "ledger": name, "error": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(line), flush=True)
    _cleanup(tag)


def _cleanup(tag: str) -> None:
    """Remove what this run left on the shared servers."""
    try:
        import redis

        client = redis.Redis.from_url(REDIS)
        keys = list(client.scan_iter(match=f"wove-bench-controls-{tag}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
    except Exception as exc:
        print(f"could not clean Redis: {exc}", file=sys.stderr)
    try:
        import psycopg

        with psycopg.connect(POSTGRES, autocommit=True) as conn:
            table = f"wove_bench_controls_{tag}"
            conn.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_leases"')
    except Exception as exc:
        print(f"could not clean PostgreSQL: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
