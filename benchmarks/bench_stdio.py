"""stdio: ``concurrent.futures.ProcessPoolExecutor`` vs ours (``Hub`` with the ``stdio``
executor) vs wove 2.0.3's ``stdio`` executor, interleaved in one run; plus the memory of
one Hub holding 10,000 in-flight runs, and payload bytes on the wire.

Same work and pool size on the first two sides: ``add(x) -> x + 1``
(``wove_adapters.testing.tasks.add``) on ``--processes`` warm worker processes (default
2, the machine's cores). wove's stdio executor has no pool: one worker process, which
runs the tasks it is sent concurrently on its event loop.

Memory: a Hub with one stdio worker, blocked by a first task that waits for a file; then
10,000 ``add`` runs are submitted (``delivery_max_in_flight`` unset: no cap) and parked in
the caller's queue. The figure is the caller's RSS (``/proc/self/status``) after all of
them are in flight minus before, per run; the runs are then released and finish.

Prints JSON lines: ``{"backend": "stdio", "native", "ours", "wove", ...}``, then
``{"kind": "memory", ...}`` and ``{"kind": "wire", ...}``.

    python benchmarks/bench_stdio.py [--seq 200] [--burst 1000] [--rounds 3]
                                     [--processes 2] [--parked 10000] [--skip-footprint]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# wove's side when it runs: what it is, next to a pool of ``--processes``.
ONE_WORKER = ("wove 2.0.3's stdio executor runs one worker process (no pool); it runs "
              "the tasks it is sent concurrently on that process's event loop")


def wait_for_file(path: str, timeout: float = 600.0) -> str:
    """The blocking first task of the memory measurement (pickled by value)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.01)
    return path


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from wove_adapters.integration.hub import Hub
    from wove_adapters.testing.tasks import add

    pool = ProcessPoolExecutor(max_workers=args.processes)
    hub = Hub(environments={"stdio": {"executor": "stdio",
                                      "executor_config": {"processes": args.processes}}},
              default_environment="stdio")
    try:
        sides = [
            common.Side("native", lambda x: pool.submit(add, x).result(60),
                 lambda n: [f.result(300) for f in [pool.submit(add, i) for i in range(n)]]),
            common.hub_side(hub),
        ]
        measured, notes = common.three_way(sides, args, "stdio", "stdio", {},
                                    with_wove=not args.no_wove)
    finally:
        hub.close()
        pool.shutdown(wait=True)
    wove_side = measured.get("wove")
    wove_note = notes["wove_note"] or ONE_WORKER
    if wove_side is not None and wove_side.error:
        wove_note = f"wove's stdio executor failed: {wove_side.error}"
    return common.record_of(
        "stdio", measured, wove_note=wove_note,
        native_description=f"ProcessPoolExecutor(max_workers={args.processes})"
                           ".submit(add, x).result()",
        ours_description=f"Hub stdio executor, processes={args.processes}",
        settings=common.settings_of(args, processes=args.processes),
    )


def memory(parked: int) -> dict[str, Any]:
    """RSS of one Hub holding ``parked`` in-flight runs (see the module docstring)."""
    from wove_adapters.integration.hub import Hub
    from wove_adapters.testing.tasks import add

    gate = Path(tempfile.mkdtemp(prefix="wove-bench-gate-")) / "open"
    hub = Hub(environments={"parked": {"executor": "stdio",
                                       "executor_config": {"processes": 1}}},
              default_environment="parked")
    try:
        assert hub.run(add, 1) == 2  # the pool, the loop and the imports are warm
        blocker = hub.submit(wait_for_file, str(gate))
        time.sleep(0.5)  # the blocker reaches the only worker
        gc.collect()
        before = common.rss_kb()
        started = time.perf_counter()
        futures = [hub.submit(add, i) for i in range(parked)]
        while len(hub._inflight) < parked + 1:  # every run has reached the dispatcher
            time.sleep(0.01)
        submit_s = time.perf_counter() - started
        gc.collect()
        after = common.rss_kb()
        gate.touch()
        blocker.result(120)
        started = time.perf_counter()
        assert [f.result(600) for f in futures] == [i + 1 for i in range(parked)]
        drain_s = time.perf_counter() - started
        gc.collect()
        settled = common.rss_kb()
    finally:
        gate.touch()
        hub.close()
    return {
        "kind": "memory",
        "backend": "stdio",
        "in_flight_runs": parked,
        "rss_before_kib": before,
        "rss_with_runs_kib": after,
        "rss_after_drain_kib": settled,
        "delta_kib": after - before,
        "per_run_bytes": round((after - before) * 1024 / parked),
        "submit_s": round(submit_s, 3),
        "drain_s": round(drain_s, 3),
        "how": "one Hub, stdio executor with 1 worker blocked by a first task; "
               f"{parked} runs submitted with hub.submit and parked in the caller's queue "
               "(no delivery_max_in_flight); VmRSS of the caller after minus before",
    }


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--parked", type=int, default=10_000)
    parser.add_argument("--no-wove", action="store_true")
    parser.add_argument("--skip-footprint", action="store_true",
                        help="skip the memory and payload-size measurements")
    parser.set_defaults(warmup=10)  # three_way's untimed round trips per side (no flag)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-stdio-"))
    common.emit(speed(args))
    if not args.skip_footprint:
        common.log(f"memory: {args.parked} parked runs")
        common.emit(memory(args.parked))
        common.emit({"kind": "wire", "sizes": common.wire_sizes(),
                     "inline_limits": common.inline_limits()})


if __name__ == "__main__":
    main()
