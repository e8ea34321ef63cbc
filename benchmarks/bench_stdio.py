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

``--task-logs`` measures instead what task logs cost a run (docs/observability.md,
"Logs"), four sides interleaved in one run, each its own environment on its own pool:
``add`` with ``task_logs`` unset (``off``) and ``"INFO"`` (``on``: the capture runs, the
task logs nothing), and a task that logs ``--records`` INFO records per run with the
setting unset (``off_logging``: the records stay on the worker, below its WARNING root)
and ``"INFO"`` (``on_logging``: every record travels and is handed to a handler in the
caller that formats it to /dev/null). Figures: round trip, burst throughput, and caller
and worker CPU per task; ratios ``on/off`` and ``on_logging/off_logging``. Prints one
``{"kind": "task_logs", ...}`` line.

    python benchmarks/bench_stdio.py [--seq 200] [--burst 1000] [--rounds 3]
                                     [--processes 2] [--parked 10000] [--skip-footprint]
                                     [--task-logs [--records 10]]
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


def add_logging(x: int) -> int:
    """``add`` that logs ``RECORDS`` INFO records first (pickled by value)."""
    import logging

    log = logging.getLogger("bench.task")
    for index in range(RECORDS):
        log.info("record %d of run %d", index, x)
    return x + 1


def add_quiet(x: int) -> int:
    return x + 1


RECORDS = 10


def task_logs_cost(args: argparse.Namespace) -> dict[str, Any]:
    """What task logs cost per run, off and on (see the module docstring)."""
    import logging

    from wove_adapters.core import tasklogs
    from wove_adapters.integration.hub import Hub

    global RECORDS
    RECORDS = args.records
    # The caller shows the records as an application would: a handler that formats each.
    sink = open(os.devnull, "w")  # closed below
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(run_id)s "
                                           "%(worker_host)s:%(worker_pid)s %(message)s"))
    task_logger = logging.getLogger(tasklogs.LOGGER_NAME)
    task_logger.addHandler(handler)
    task_logger.setLevel(logging.INFO)
    task_logger.propagate = False
    plan = {"off": (add_quiet, {}), "on": (add_quiet, {"task_logs": "INFO"}),
            "off_logging": (add_logging, {}), "on_logging": (add_logging, {"task_logs": "INFO"})}
    hub = Hub(environments={
        name: {"executor": "stdio", "executor_config": {"processes": args.processes}, **extra}
        for name, (_, extra) in plan.items()}, default_environment="off")
    meter = common.CpuMeter(args.burst, lambda: [pid for name in plan
                                          for pid in hub.dispatcher(name).transport.pids])
    try:
        sides = []
        for name, (fn, _) in plan.items():
            side = common.hub_side(hub, environment=name, name=name, fn=fn)
            side.burst = meter.wrap(name, side.burst)
            sides.append(side)
        measured = common.interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=10, label="stdio task logs")
        tasklogs.flush(60)
        emitted = hub.dispatcher("on_logging").stats.get("task_logs_emitted", 0)
    finally:
        hub.close()
        task_logger.removeHandler(handler)
        sink.close()
    figures = {name: {**(side.summary() or {"error": side.error}), **meter.figures(name)}
               for name, side in measured.items()}

    def ratios(on: str, off: str) -> dict[str, float | None]:
        a, b = figures[on], figures[off]
        return {key: common.ratio(a.get(key), b.get(key))
                for key in ("p50_ms", "throughput_per_s", "caller_cpu_us_per_task",
                            "worker_cpu_us_per_task")}

    return {
        "kind": "task_logs",
        "backend": "stdio",
        "records_per_run": args.records,
        "records_emitted_on_logging": emitted,
        "sides": figures,
        "ratio_on_off": ratios("on", "off"),
        "ratio_on_logging_off_logging": ratios("on_logging", "off_logging"),
        "settings": {"seq": args.seq, "burst": args.burst, "rounds": args.rounds,
                     "processes": args.processes},
    }


def main() -> None:
    parser = common.speed_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--parked", type=int, default=10_000)
    parser.add_argument("--no-wove", action="store_true")
    parser.add_argument("--skip-footprint", action="store_true",
                        help="skip the memory and payload-size measurements")
    parser.add_argument("--task-logs", action="store_true",
                        help="measure what task logs cost per run, off and on, instead")
    parser.add_argument("--records", type=int, default=10,
                        help="with --task-logs: records each logging run makes")
    parser.set_defaults(warmup=10)  # three_way's untimed round trips per side (no flag)
    args = parser.parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix="wove-bench-stdio-"))
    if args.task_logs:
        common.emit(task_logs_cost(args))
        return
    common.emit(speed(args))
    if not args.skip_footprint:
        common.log(f"memory: {args.parked} parked runs")
        common.emit(memory(args.parked))
        common.emit({"kind": "wire", "sizes": common.wire_sizes(),
                     "inline_limits": common.inline_limits()})


if __name__ == "__main__":
    main()
