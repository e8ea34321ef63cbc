"""The pipeline ``wove-adapters demo`` runs: a small log-analytics job.

Local steps generate and split a day of synthetic access logs; a mapped step parses 50
chunks on worker processes (another environment); a local step merges the partial counts.
The functions live in a module (not in the CLI) so workers import them by name.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

ENDPOINTS = ("/api/orders", "/api/users", "/api/search", "/health", "/api/cart", "/login")


def generate_logs(lines: int = 50_000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        endpoint = rng.choices(ENDPOINTS, weights=(30, 20, 25, 5, 15, 5))[0]
        status = rng.choices((200, 201, 304, 404, 500, 503), weights=(80, 5, 5, 5, 3, 2))[0]
        latency = round(rng.lognormvariate(3.0, 0.6), 1)
        out.append(f"{i} GET {endpoint} {status} {latency}ms")
    return out


def split(lines: list[str], chunks: int = 50) -> list[list[str]]:
    size = -(-len(lines) // chunks)
    return [lines[i : i + size] for i in range(0, len(lines), size)]


def parse_chunk(chunk: list[str]) -> dict[str, Any]:
    """The mapped step: runs on a worker process."""
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    for line in chunk:
        _, _, endpoint, status, latency = line.split()
        counts[endpoint] += 1
        if status.startswith("5"):
            errors[endpoint] += 1
        latencies[endpoint].append(float(latency[:-2]))
    return {"counts": dict(counts), "errors": dict(errors), "latencies": dict(latencies)}


def timed(fn: Any, *args: Any) -> dict[str, Any]:
    """Run ``fn(*args)`` where the task runs and say when it started and for how long.

    The caller sees only submit-to-result time; splitting it into the wait before the
    task started (queue, transfer, worker start) and the run itself needs the worker's
    own clock readings. ``started_at`` is wall-clock time, comparable with the caller's
    on one machine (and roughly across machines with synchronised clocks)."""
    started_at = time.time()
    begin = time.perf_counter()
    value = fn(*args)
    return {
        "value": value,
        "started_at": started_at,
        "run_s": time.perf_counter() - begin,
        "pid": os.getpid(),
    }


def merge(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: dict[str, list[float]] = defaultdict(list)
    for part in parts:
        counts.update(part["counts"])
        errors.update(part["errors"])
        for endpoint, values in part["latencies"].items():
            latencies[endpoint].extend(values)
    rows = []
    for endpoint, count in counts.most_common():
        values = sorted(latencies[endpoint])
        rows.append(
            {
                "endpoint": endpoint,
                "requests": count,
                "error_rate": errors[endpoint] / count,
                "p50_ms": statistics.median(values),
                "p95_ms": values[int(len(values) * 0.95) - 1],
            }
        )
    return rows
