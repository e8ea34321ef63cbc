"""Shared helpers for the benchmark scripts: interleaved timing, percentiles, throughput,
memory, payload sizes, machine facts, and wove 2.x's own runtime driven warm.

Every ``bench_*.py`` script prints one JSON line per measured configuration on stdout
(anything else goes to stderr); ``benchmarks/run.py`` collects them. The figures per side
are ``{"p50_ms", "p99_ms", "throughput_per_s"}``:

- p50/p99: sequential round trips of ``add(x) -> x + 1`` (submit, wait for the result,
  next), the sides taking turns sample by sample, the order rotating, so a burst of
  machine noise hits every side alike;
- throughput: ``burst`` tasks submitted at once, then every result awaited; the median of
  ``rounds`` rounds, the sides taking turns round by round.

This module imports only the standard library at module level; wove, wove-adapters and
backend libraries are imported where they are used, so it loads in every environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"

# Distributions whose versions a result records (those installed in the measuring env).
VERSIONED = (
    "wove-adapters", "wove", "cloudpickle", "msgspec", "aiohttp", "celery", "kombu", "redis",
    "rq", "arq", "taskiq", "taskiq-redis", "dask", "distributed", "ray", "temporalio",
)


def log(*parts: object) -> None:
    """Progress on stderr (stdout carries only the JSON result lines)."""
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- statistics


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1), the definition every script here uses."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(latencies_s: Sequence[float], rates: Sequence[float],
              digits: int = 3, rate_digits: int = 1) -> dict[str, float]:
    """``{"p50_ms", "p99_ms", "throughput_per_s"}`` from round trips (seconds) and rates;
    ``digits`` / ``rate_digits``: the ms / tasks-per-second rounding a script has always
    printed (its output format)."""
    return {
        "p50_ms": round(statistics.median(latencies_s) * 1000, digits),
        "p99_ms": round(percentile(latencies_s, 0.99) * 1000, digits),
        "throughput_per_s": round(statistics.median(rates), rate_digits) if rates else 0.0,
    }


def round_trips(call: Callable[[int], Any], count: int, first: int = 0, *,
                check: bool = True) -> list[float]:
    """``call(i)`` for ``count`` values of ``i`` from ``first``, one after the other, each
    checked to return ``i + 1``: the seconds each took (the two-way scripts' sequential
    leg; ``first`` lets sides alternate one sample at a time). ``check=False`` for a
    native path that learns only that its job finished, not the job's value."""
    times = []
    for i in range(first, first + count):
        start = time.perf_counter()
        value = call(i)
        times.append(time.perf_counter() - start)
        if check and value != i + 1:
            raise AssertionError(f"add({i}) returned {value!r}")
    return times


def burst_rate(call: Callable[[int], Sequence[Any] | None], count: int, *,
               check: bool = True) -> float:
    """Tasks per second of ``call(count)`` (all submitted at once, every result awaited),
    checked to return ``1..count`` in order (unless ``check=False``, as above)."""
    start = time.perf_counter()
    values = call(count)
    elapsed = time.perf_counter() - start
    if check and list(values or ()) != [i + 1 for i in range(count)]:
        raise AssertionError("a burst returned wrong values")
    return count / elapsed


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def ratios(ours: dict[str, Any] | None, base: dict[str, Any] | None) -> dict[str, float | None]:
    """``p50`` (lower is better for ours) and ``throughput`` (higher is better)."""
    if not ours or not base:
        return {"p50": None, "throughput": None}
    return {
        "p50": ratio(ours.get("p50_ms"), base.get("p50_ms")),
        "throughput": ratio(ours.get("throughput_per_s"), base.get("throughput_per_s")),
    }


def take_turns(
    sides: dict[str, tuple[Callable[[int], Any] | None, Callable[[int], Sequence[Any]]]],
    *,
    seq: int,
    burst: int,
    rounds: int,
) -> dict[str, tuple[list[float], list[float]]]:
    """The two-way scripts' turns, block by block: each round, each side in order runs
    ``seq`` round trips (``one``), then one burst (``many``). Per side: (latencies, rates).
    A side whose ``one`` is None only bursts (``burst_only``)."""
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
    for _ in range(rounds):
        for name, (one, many) in sides.items():
            if one is not None:
                out[name][0].extend(round_trips(one, seq))
            out[name][1].append(burst_rate(many, burst))
    return out


def alternate(
    sides: dict[str, tuple[Callable[[int], Any] | None, Callable[[int], Sequence[Any] | None]]],
    *,
    seq: int,
    burst: int,
    rounds: int,
    warmup: int,
    before_burst: Callable[[], None] | None = None,
    unchecked: Collection[str] = (),
) -> dict[str, tuple[list[float], list[float]]]:
    """The two-way scripts' other turns: ``warmup`` untimed round trips per side, then
    the sides alternate sample by sample (``seq`` each), then burst by burst (``rounds``
    each; ``before_burst`` runs untimed before each). Per side: (latencies, rates).

    A side whose ``one`` is None only bursts (a control); the sides named in
    ``unchecked`` return no values to check (``round_trips``' ``check=False``)."""
    for name, (one, _) in sides.items():
        if one is not None:
            round_trips(one, warmup, check=name not in unchecked)
    out: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
    for i in range(seq):
        for name, (one, _) in sides.items():
            if one is not None:
                out[name][0].extend(round_trips(one, 1, first=i, check=name not in unchecked))
    for _ in range(rounds):
        for name, (_, many) in sides.items():
            if before_burst is not None:
                before_burst()
            out[name][1].append(burst_rate(many, burst, check=name not in unchecked))
    return out


def ratio_block(ours: dict[str, float], native: dict[str, float],
                keys: Sequence[str] = ("p50", "p99", "throughput")) -> dict[str, float | None]:
    """ours/native per figure (``p50`` -> ``p50_ms``, ``throughput`` ->
    ``throughput_per_s``), as the two-way scripts print it."""
    field_of = {"p50": "p50_ms", "p99": "p99_ms", "throughput": "throughput_per_s"}
    return {key: ratio(ours[field_of[key]], native[field_of[key]]) for key in keys}


def hub_calls(hub: Any, fn: Callable[[int], int], *, chunked: bool = False, **settings: Any
              ) -> tuple[Callable[[int], Any], Callable[[int], list[Any]]]:
    """Ours as a ``take_turns`` side: ``Hub.run(fn, x)`` and ``Hub.map(fn, range(n))``.
    The burst sends each run alone (what the single-run targets compare) unless
    ``chunked``: then ``map_chunk_size="auto"`` packs runs into chunks."""
    size: Any = "auto" if chunked else 0
    return (lambda x: hub.run(fn, x, **settings),
            lambda n: hub.map(fn, range(n), map_chunk_size=size, **settings))


def emit_paths(backend: str, measured: dict[str, tuple[list[float], list[float]]], *,
               chunked: str | None = None, cpu: CpuMeter | None = None) -> None:
    """One result line per return path of ours against the ``baseline`` side (the native
    path), the format bench_dask and bench_ray have always printed. ``chunked``: the name
    of a burst-only side (``Hub.map`` with chunking on the ``http`` path), reported in the
    ``http`` line as ``ours_chunked`` rather than as a path of its own; ``cpu``: the
    meter whose per-task CPU figures join each side's."""

    def extra(name: str) -> dict[str, float]:
        return cpu.figures(name) if cpu is not None else {}

    native = {**summarize(*measured["baseline"], digits=2), **extra("baseline")}
    for path, (samples, rates) in measured.items():
        if path in ("baseline", chunked):
            continue
        ours = {**summarize(samples, rates, digits=2), **extra(path)}
        line: dict[str, Any] = {
            "backend": backend, "return_path": path, "native": native, "ours": ours,
            "ratio_p50": round(ours["p50_ms"] / native["p50_ms"], 2),
            "ratio_throughput": round(ours["throughput_per_s"] / native["throughput_per_s"], 2),
        }
        if chunked is not None and path == "http":
            line.update(chunked_record(
                {**burst_summary(measured[chunked][1]), **extra(chunked)}, native))
        emit(line)


# ---------------------------------------------------------------- interleaved runs


@dataclass
class Side:
    """One way of running ``add``: ``one(x)`` returns ``x + 1`` after a full round trip;
    ``burst(n)`` submits ``add(0..n-1)`` at once and returns every result in order."""

    name: str
    one: Callable[[int], Any]
    burst: Callable[[int], list[Any]]
    # Work a side leaves behind after its results are in (our ledger writes, queued on
    # the loop): run untimed after each burst, so it cannot steal the next side's CPU;
    # its time is reported separately (``throughput_incl_settle_per_s``).
    settle: Callable[[], None] | None = None
    # Run untimed before each burst (e.g. wait until a server has closed earlier work).
    before_burst: Callable[[], None] | None = None
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    settled_rates: list[float] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> dict[str, Any] | None:
        if self.error is not None or not self.latencies:
            return None
        out: dict[str, Any] = {**summarize(self.latencies, self.rates),
                               "samples": len(self.latencies),
                               "throughput_rounds": len(self.rates)}
        if self.settled_rates:
            out["throughput_incl_settle_per_s"] = round(statistics.median(self.settled_rates), 1)
        return out


def _fail(side: Side, phase: str, exc: BaseException) -> None:
    side.error = f"{phase}: {type(exc).__name__}: {exc}"
    log(f"[{side.name}] failed during {phase}: {side.error}")
    log("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:])


def _in_turn(sides: list[Side], turn: int) -> list[Side]:
    """The sides still measuring (no error), starting with a different one each turn, so
    that no side always goes first."""
    live = [s for s in sides if s.error is None]
    shift = turn % len(live) if live else 0
    return live[shift:] + live[:shift]


def interleave(
    sides: Sequence[Side],
    *,
    seq: int,
    burst: int,
    rounds: int,
    warmup: int = 10,
    label: str = "",
) -> dict[str, Side]:
    """Measure every side in turns (see the module docstring). A side that raises is
    dropped with its error recorded (``side.error``); the others carry on."""
    live = list(sides)
    tag = f"[{label}] " if label else ""
    for side in live:
        try:
            for i in range(warmup):
                value = side.one(i)
                if value != i + 1:
                    raise AssertionError(f"add({i}) returned {value!r}")
            warm = min(burst, 50)
            if side.burst(warm) != [i + 1 for i in range(warm)]:
                raise AssertionError("a warm-up burst returned wrong values")
            if side.settle is not None:
                side.settle()
        except Exception as exc:
            _fail(side, "warm-up", exc)
    live = [s for s in live if s.error is None]
    log(f"{tag}sequential: {seq} round trips x {[s.name for s in live]}")
    for i in range(seq):
        for side in _in_turn(live, i):
            try:
                start = time.perf_counter()
                value = side.one(i)
                elapsed = time.perf_counter() - start
                if value != i + 1:
                    raise AssertionError(f"add({i}) returned {value!r}")
                side.latencies.append(elapsed)
            except Exception as exc:
                _fail(side, f"round trip {i}", exc)
    live = [s for s in live if s.error is None]
    for side in live:
        if side.settle is not None:
            side.settle()
    expected = [i + 1 for i in range(burst)]
    for r in range(rounds):
        for side in _in_turn(live, r):
            try:
                if side.before_burst is not None:
                    side.before_burst()
                start = time.perf_counter()
                values = side.burst(burst)
                elapsed = time.perf_counter() - start
                if list(values) != expected:
                    raise AssertionError("a burst returned wrong values")
                side.rates.append(burst / elapsed)
                note = ""
                if side.settle is not None:
                    side.settle()
                    settled = time.perf_counter() - start
                    side.settled_rates.append(burst / settled)
                    note = f" ({burst / settled:.1f}/s with its settle)"
                log(f"{tag}burst {r + 1}/{rounds} {side.name}: {burst / elapsed:.1f}/s{note}")
            except Exception as exc:
                _fail(side, f"burst round {r + 1}", exc)
    return {side.name: side for side in sides}


def hub_side(hub: Any, environment: str | None = None, name: str = "ours",
             fn: Callable[[int], int] | None = None) -> Side:
    """Ours: ``Hub.run(add, x)`` / ``Hub.map(add, range(n))`` with its settle step (the
    environment's dispatcher flushing its queued ledger writes)."""
    from wove_adapters.core import loop as shared_loop
    from wove_adapters.testing.tasks import add as default_add

    add = fn or default_add

    def settle() -> None:
        shared_loop.run_sync(hub.dispatcher(environment).flush(), 300)

    return Side(
        name,
        lambda x: hub.run(add, x, environment=environment),
        lambda n: hub.map(add, range(n), environment=environment),
        settle=settle,
    )


def settings_of(args: Any, **more: Any) -> dict[str, Any]:
    """The run's shape as a result line records it: ``seq``, ``burst`` and ``rounds`` from
    the script's arguments, plus what else the script varies."""
    return {"seq": args.seq, "burst": args.burst, "rounds": args.rounds, **more}


def two_way_record(backend: str, measured: dict[str, Side], **extra: Any) -> dict[str, Any]:
    """The JSON line of a native-vs-ours run without a wove side: figures, errors, ratio."""
    native = measured["native"].summary()
    ours = measured["ours"].summary()
    return {
        "backend": backend,
        "native": native,
        "ours": ours,
        "errors": {name: side.error for name, side in measured.items() if side.error},
        "ratio_ours_native": ratios(ours, native),
        **extra,
    }


def record_of(backend: str, measured: dict[str, Side], *, wove_note: str | None = None,
              **extra: Any) -> dict[str, Any]:
    """The JSON line of a three-way run (native, ours, wove): figures, errors, ratios."""
    native = measured["native"].summary() if "native" in measured else None
    ours = measured["ours"].summary() if "ours" in measured else None
    wove_side = measured.get("wove")
    wove = wove_side.summary() if wove_side is not None else None
    if wove_side is not None and wove_side.error and not wove_note:
        wove_note = f"wove's adapter failed during the run: {wove_side.error}"
    return {
        "backend": backend,
        "native": native,
        "ours": ours,
        "wove": wove,
        "wove_note": wove_note,
        "errors": {name: side.error for name, side in measured.items() if side.error},
        "ratio_ours_native": ratios(ours, native),
        "ratio_ours_wove": ratios(ours, wove),
        **extra,
    }


def three_way(
    sides: list[Side],
    args: Any,
    label: str,
    executor: str,
    executor_config: dict[str, Any],
    *,
    weave: bool = False,
    weave_config: dict[str, Any] | None = None,
    workers: int | None = None,
    before_burst: Callable[[], None] | None = None,
    on_start: Callable[[WoveRuntime], None] | None = None,
    on_close: Callable[[WoveRuntime], None] | None = None,
    with_wove: bool = True,
) -> tuple[dict[str, Side], dict[str, Any]]:
    """Add wove's warm side to ``sides`` (native and ours), measure all in turns, then (with
    ``weave``) time one-task weaves once the warm runtime is gone, so the two never
    share the backend. Returns the measured sides and the ``record_of`` keywords
    (``wove_note``; ``wove_weave_per_task`` with ``weave``). A wove that does not start
    is a note, not a failure: native and ours are still measured.

    ``on_start``/``on_close`` run on the warm runtime after it starts / before it stops
    (a broker wove's adapter needs started on its loop). ``weave_config``: the weave's
    ``executor_config`` when the warm one holds a live client a weave cannot share.
    ``with_wove=False`` (a script's ``--no-wove``): native and ours only."""
    notes: dict[str, Any] = {"wove_note": None}
    wove: WoveRuntime | None = None
    try:
        if with_wove:
            try:
                wove = WoveRuntime(executor, executor_config)
                if on_start is not None:
                    on_start(wove)
                side = wove.side(workers=workers)
                side.before_burst = before_burst
                sides = [*sides, side]
            except Exception as exc:
                notes["wove_note"] = (f"wove's {executor} executor did not start: "
                                      f"{type(exc).__name__}: {exc}")
        measured = interleave(sides, seq=args.seq, burst=args.burst, rounds=args.rounds,
                              warmup=args.warmup, label=label)
        if weave:
            notes["wove_weave_per_task"] = None
        if weave and wove is not None and args.weave_samples:
            _close_wove(wove, on_close)
            wove = None
            log("timing one-task wove weaves")
            try:
                notes["wove_weave_per_task"] = weave_round_trip(
                    {"executor": executor,
                     "executor_config": executor_config if weave_config is None
                     else weave_config},
                    args.weave_samples)
            except Exception as exc:
                notes["wove_weave_per_task"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if wove is not None:
            _close_wove(wove, on_close)
    return measured, notes


def _close_wove(wove: WoveRuntime, on_close: Callable[[WoveRuntime], None] | None) -> None:
    try:
        if on_close is not None:
            on_close(wove)
    finally:
        wove.close()


def speed_arguments(description: str | None = None, *, seq: int = 200, burst: int = 1000,
                    rounds: int = 3, seq_flag: str = "--seq") -> Any:
    """The three knobs every benchmark script takes (``benchmarks/run.py`` reads them from
    its ``--help``); ``seq_flag``: the name a script has always used (``--n``)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(seq_flag, type=int, default=seq, help="sequential round trips per side")
    parser.add_argument("--burst", type=int, default=burst, help="tasks submitted at once")
    parser.add_argument("--rounds", type=int, default=rounds, help="burst rounds per side")
    return parser


def bench_arguments(description: str, *, seq: int = 200, burst: int = 1000,
                    rounds: int = 3) -> Any:
    """The arguments every ``bench_wove_*.py`` script takes."""
    parser = speed_arguments(description, seq=seq, burst=burst, rounds=rounds)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--weave-samples", type=int, default=3,
                        help="one-task `with wove.weave()` blocks to time (0: skip)")
    return parser


def emit(record: dict[str, Any]) -> None:
    """One result line on stdout."""
    print(json.dumps(record), flush=True)


# ---------------------------------------------------------------- machine, memory


def rss_kb() -> int:
    """This process's resident set size (VmRSS from /proc/self/status), in KiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("VmRSS not found in /proc/self/status")


def versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    found = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def machine() -> dict[str, Any]:
    """The facts a reader needs to judge the figures."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                break
    return info


# ---------------------------------------------------------------- wove 2.x, warm


class WoveRuntime:
    """wove 2.0.3's ``ExecutorRuntime`` with one environment, started once and kept warm on
    its own event-loop thread, driven the way a weave drives it (``run_task`` per task,
    one asyncio task per item for a mapped task).

    This is wove at its best: a weave (``with wove.weave() as w``) builds and stops the
    runtime, its callback server and the backend client on every block, which costs
    ~0.5 s at close on top of what is measured here (see ``weave_round_trip``).
    """

    ENV = "bench"

    def __init__(self, executor: Any, executor_config: dict[str, Any] | None = None,
                 *, timeout: float = 60.0, start_timeout: float = 120.0) -> None:
        from wove.environment import ExecutorRuntime

        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="wove-bench-loop", daemon=True)
        self._thread.start()
        definition = {"executor": executor, "executor_config": dict(executor_config or {})}
        run_config = {"error_mode": "raise", "max_pending": None,
                      "delivery_heartbeat_seconds": None, "delivery_orphan_policy": None}
        self.runtime = ExecutorRuntime({self.ENV: definition}, run_config)
        self.call(self.runtime.start(), start_timeout)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout if timeout is not None else self.timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _task(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Coroutine[Any, Any, Any]:
        return self.runtime.run_task(
            task_name=getattr(fn, "__name__", "task"), task_func=fn, task_args=kwargs,
            task_info={"environment": self.ENV},
        )

    def run(self, fn: Callable[..., Any], **kwargs: Any) -> Any:
        return self.call(self._task(fn, kwargs))

    def map(self, fn: Callable[..., Any], items: Sequence[dict[str, Any]],
            workers: int | None = None) -> list[Any]:
        """One task per item, all at once; at most ``workers`` in flight if given (what a
        mapped wove task's ``workers=`` does: a semaphore around each item)."""

        async def gather() -> list[Any]:
            gate = asyncio.Semaphore(workers) if workers else None

            async def one(kwargs: dict[str, Any]) -> Any:
                if gate is None:
                    return await self._task(fn, kwargs)
                async with gate:
                    return await self._task(fn, kwargs)

            tasks = [asyncio.ensure_future(one(kwargs)) for kwargs in items]
            return list(await asyncio.gather(*tasks))

        return self.call(gather(), max(self.timeout, 600.0))

    def side(self, name: str = "wove", workers: int | None = None) -> Side:
        from wove_adapters.testing.tasks import add

        return Side(
            name,
            lambda x: self.run(add, x=x),
            lambda n: self.map(add, [{"x": i} for i in range(n)], workers),
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.runtime.stop(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def wove_attempt(executor: str, executor_config: dict[str, Any], *,
                 timeout: float = 30.0) -> str | None:
    """Run one task through wove's adapter; ``None`` if it worked, else why not."""
    try:
        runtime = WoveRuntime(executor, executor_config, timeout=timeout)
    except Exception as exc:
        return f"wove's {executor} environment did not start: {type(exc).__name__}: {exc}"
    try:
        from wove_adapters.testing.tasks import add

        value = runtime.run(add, x=1)
        if value != 2:
            return f"wove's {executor} adapter returned {value!r} for add(1)"
        return None
    except TimeoutError:
        return f"wove's {executor} adapter gave no result within {timeout:.0f}s"
    except Exception as exc:
        return f"wove's {executor} adapter failed: {type(exc).__name__}: {_compact(exc)}"
    finally:
        runtime.close()


def wove_attempt_record(backend: str, executor: str, failure: str | None) -> dict[str, Any]:
    """The JSON line of a script that only tries wove's adapter once (``wove_attempt``)."""
    return {"backend": backend, "native": None, "ours": None, "wove": None,
            "wove_note": failure or f"wove's {executor} adapter ran one task; "
                                    "no figures were measured"}


def attempt_once(executor: str, doc: str,
                 stand_in: Callable[[Path], contextlib.AbstractContextManager[dict[str, Any]]],
                 backend: str | None = None) -> None:
    """The whole run of a script that can only try wove's adapter once: its arguments (the
    usual ones, for ``run.py``), a data dir of its own, then one ``wove_attempt`` on
    wove's executor config from ``stand_in(workdir)`` (which starts the tests' stand-in
    for the backend in a fresh directory and stops it on leaving), and the record of how
    that went."""
    bench_arguments(doc.split("\n\n")[0]).parse_args()
    os.environ.setdefault("WOVE_ADAPTERS_HOME", tempfile.mkdtemp(prefix=f"wove-bench-{executor}-"))
    with stand_in(Path(tempfile.mkdtemp(prefix=f"bench-wove-{executor}-"))) as executor_config:
        failure = wove_attempt(executor, executor_config, timeout=60)
    emit(wove_attempt_record(backend or executor, executor, failure))


def _compact(exc: BaseException) -> str:
    """An exception's message in one line; an API error's own ``message`` if it has one."""
    import re

    text = str(exc)
    found = re.search(r'"message":\s*"((?:[^"\\]|\\.)*)"', text)
    if found:
        text = found.group(1).replace('\\"', '"')
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."



def weave_round_trip(environment: dict[str, Any], samples: int = 5) -> dict[str, float]:
    """What one task costs through wove's public API, a fresh ``with wove.weave()`` block
    per task (the runtime, callback server and backend client built and torn down each
    time): p50/max over ``samples`` blocks, in ms."""
    import wove

    from wove_adapters.testing.tasks import add

    def task_for(value: int) -> Callable[[], int]:
        def step() -> int:  # wove reads dependencies from the signature: none here
            return add(value)

        return step

    wove.config(environments={"wove-bench": environment})
    times = []
    for i in range(samples):
        start = time.perf_counter()
        with wove.weave(environment="wove-bench") as w:
            w.do(task_for(i))

        assert w.result.step == i + 1
        times.append(time.perf_counter() - start)
    return {"p50_ms": round(statistics.median(times) * 1000, 1),
            "max_ms": round(max(times) * 1000, 1), "samples": samples}


# ---------------------------------------------------------------- payload bytes


def wire_sizes(sizes: Sequence[int] = (1024, 1024 * 1024)) -> dict[str, Any]:
    """Bytes on the wire for one task with a ``size``-byte argument (the callable, by
    reference: ``wove_adapters.testing.tasks.digest``) and a result of the same size,
    measured with the encoders the real paths use:

    - ours: the signed payload text a backend carries (``wove1.`` + base64 of the signed
      msgpack envelope, body inline), the same with the body offloaded to the payload
      store (what travels when the body exceeds an adapter's inline limit, plus the body
      itself in the store), and the signed event batch one callback POST carries;
    - wove 2.0.3: its backend payload (base64 of JSON with base64 pickles, as it puts in
      environment variables and ``--wrap`` lines; queue backends get the JSON dict) and
      its callback POST body.
    """
    import secrets

    from wove.backend import build_backend_payload, payload_to_b64, serialize_frame

    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core import frames, signing
    from wove_adapters.core.codec import sign_events
    from wove_adapters.testing.tasks import digest as task

    key_id = signing.KEYRING.add(secrets.token_bytes(32))
    return_path = payload_mod.ReturnPath(kind="http", url="http://127.0.0.1:40000/wove/events/"
                                         + secrets.token_urlsafe(24))
    store_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"wove-bench-store-{os.getpid()}"
    out: dict[str, Any] = {}
    for size in sizes:
        arg = os.urandom(size)
        run_id = f"digest:{secrets.token_hex(16)}"
        body = payload_mod.dumps((task, {"data": arg}))
        common: dict[str, Any] = {
            "adapter": "process", "run_id": run_id, "task_id": "digest", "attempt": 1,
            "func": task, "args": {"data": arg}, "return_path": return_path,
            "delivery": {}, "key_id": key_id, "body": body,
        }
        inline = payload_mod.encode_payload(
            payload_mod.build_envelope(**common, inline_limit=1 << 62, store_url=None))
        offloaded = payload_mod.encode_payload(payload_mod.build_envelope(
            **common, inline_limit=0, store_url=f"file://{store_dir}"))
        event = frames.TaskResult(run_id=run_id, task_id="digest", attempt=1,
                                  result=payload_mod.dumps(arg))
        batch = signing.encode_blob(sign_events([event], key_id))
        wove_frame = {"type": "run_task", "run_id": run_id, "task_id": "digest",
                      "callable": task, "args": {"data": arg}, "delivery": {}}
        wove_payload = build_backend_payload(
            wove_frame, callback_url=return_path.url, adapter="celery")
        wove_b64 = payload_to_b64(wove_payload)
        wove_json = json.dumps(wove_payload, separators=(",", ":"))
        wove_event = json.dumps(serialize_frame(
            {"type": "task_result", "run_id": run_id, "task_id": "digest", "result": arg}),
            separators=(",", ":"))
        out[_size_label(size)] = {
            "argument_bytes": size,
            "pickled_body_bytes": len(body),
            "ours": {
                "payload_text_inline": len(inline),
                "payload_text_offloaded": len(offloaded),
                "store_object": len(body),
                "result_event_batch": len(batch),
            },
            "wove": {
                "payload_b64": len(wove_b64),
                "payload_json": len(wove_json),
                "result_event_json": len(wove_event),
            },
        }
    with contextlib.suppress(OSError):
        for child in store_dir.iterdir():
            child.unlink()
        store_dir.rmdir()
    return out


def inline_limits() -> dict[str, int]:
    """Each built-in adapter's inline payload limit (bytes): above it, the body goes to the
    payload store. Read from the classes without their backend libraries (those are
    imported inside methods only)."""
    import importlib

    from wove_adapters.adapters import registry
    from wove_adapters.core.policies import Capabilities

    limits = {"(core default)": Capabilities().inline_payload_limit}
    for name, (target, _extra) in sorted(registry._BUILTINS.items()):
        with contextlib.suppress(Exception):
            if isinstance(target, str):  # "module:Class", imported here
                module_name, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module_name), attr)
            limits[name] = int(target.capabilities.inline_payload_limit)
    return limits


def _size_label(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size // (1024 * 1024)}MB"
    return f"{size // 1024}KB"


# ---------------------------------------------------------------- chunked side, CPU per task
#
# Issue 16's targets compare two more things than p50 and throughput: ``Hub.map`` with
# chunking (``map_chunk_size="auto"``, K runs per backend message) against native's one
# task per message, and the CPU a task costs the caller and the workers. Both are
# measured in the same interleaved run as native and ours, so their ratios are same-run
# ratios like the others (the machine is shared; absolute figures drift with its load).


def burst_only(many: Callable[[int], Sequence[Any]]) -> tuple[None, Callable[[int], Sequence[Any]]]:
    """A side that only bursts (``alternate``/``take_turns`` skip its round trips): the
    chunked side, whose single runs are ours' single runs (a lone ``Hub.run`` is never
    chunked), so timing them again would only lengthen the run."""
    return None, many


def burst_summary(rates: Sequence[float], rate_digits: int = 1) -> dict[str, float]:
    """``{"throughput_per_s"}`` of a burst-only side (no round trips, so no p50/p99)."""
    return {"throughput_per_s": round(statistics.median(rates), rate_digits) if rates else 0.0}


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, int, float]]:
    """pid -> (parent pid, session id, CPU seconds: utime + stime + cutime + cstime) for
    every process readable in /proc. cutime/cstime hold the reaped children (RQ's
    work-horses, one fork per job), which no scan could catch alive."""
    out: dict[int, tuple[int, int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
            fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"
            # fields[0] is state (field 3): ppid 4, session 6, utime..cstime 14..17.
            ticks = sum(int(v) for v in fields[11:15])
            out[int(entry.name)] = (int(fields[1]), int(fields[3]), ticks / _CLK_TCK)
    return out


def tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds used so far by the processes ``roots`` started: every descendant of a
    root and every process in a root's session (the benchmark workers run in sessions of
    their own: ``ServiceProcess``; Ray's raylet starts its workers in the head's session,
    not as the CLI's children)."""
    stats = _proc_stats()
    sessions = {stats[pid][1] for pid in roots if pid in stats}
    sessions.discard(os.getsid(0))  # a root in our own session: never count ourselves
    chosen = {pid for pid, (_, sid, _) in stats.items() if sid in sessions}
    chosen.update(pid for pid in roots if pid in stats)
    grew = True
    while grew:
        more = {pid for pid, (ppid, _, _) in stats.items() if ppid in chosen} - chosen
        chosen |= more
        grew = bool(more)
    return sum(stats[pid][2] for pid in chosen)


@dataclass
class CpuMeter:
    """Caller and worker CPU per task of each side's bursts of ``burst`` tasks (warm-up
    bursts of other sizes are not counted): ``time.process_time()`` of this process (all
    its threads: Hub loop, ledger, receiver, backend client) and ``tree_cpu_seconds`` of
    the worker processes, before and after the burst, over the tasks. The worker side is
    the whole deployment the script started (a Dask scheduler, Ray's GCS and raylet
    included): the same processes for every side, so the sides compare fairly."""

    burst: int
    worker_pids: Callable[[], Sequence[int]]
    caller: dict[str, list[float]] = field(default_factory=dict)
    worker: dict[str, list[float]] = field(default_factory=dict)

    def wrap(self, name: str, many: Callable[[int], T]) -> Callable[[int], T]:
        """``many`` with its CPU counted under ``name`` when it runs ``burst`` tasks."""

        def measured(count: int) -> T:
            if count != self.burst:
                return many(count)
            pids = list(self.worker_pids())
            caller0, worker0 = time.process_time(), tree_cpu_seconds(pids)
            out = many(count)
            caller1, worker1 = time.process_time(), tree_cpu_seconds(pids)
            self.caller.setdefault(name, []).append((caller1 - caller0) / count * 1e6)
            self.worker.setdefault(name, []).append((worker1 - worker0) / count * 1e6)
            return out

        return measured

    def side(self, name: str, calls: tuple[Any, Callable[[int], Any]]) -> tuple[Any, Any]:
        """A ``(one, many)`` side with its ``many`` wrapped (``wrap``)."""
        return calls[0], self.wrap(name, calls[1])

    def figures(self, name: str) -> dict[str, float]:
        """``{"caller_cpu_us_per_task", "worker_cpu_us_per_task"}``: medians over the
        side's bursts (empty if it had none)."""
        out: dict[str, float] = {}
        if self.caller.get(name):
            out["caller_cpu_us_per_task"] = round(statistics.median(self.caller[name]), 1)
        if self.worker.get(name):
            out["worker_cpu_us_per_task"] = round(statistics.median(self.worker[name]), 1)
        return out


def metered_sides(cpu: CpuMeter, hubs: dict[str, Any], fn: Callable[[int], int],
                  **native: tuple[Any, Callable[[int], Any]]) -> dict[str, tuple[Any, Any]]:
    """The sides of a same-run comparison, each burst metered by ``cpu``: the native
    side(s), ours through each of ``hubs`` (by side name: one Hub, or one per return
    path), and ``chunked``: the first hub's ``Hub.map`` with chunking, bursts only."""
    first = next(iter(hubs.values()))
    sides = {**native, **{name: hub_calls(hub, fn) for name, hub in hubs.items()},
             "chunked": burst_only(hub_calls(first, fn, chunked=True)[1])}
    return {name: cpu.side(name, calls) for name, calls in sides.items()}


def side_figures(measured: dict[str, tuple[list[float], list[float]]], cpu: CpuMeter,
                 name: str, digits: int = 3) -> dict[str, float]:
    """One side's p50, p99 and throughput (``summarize``) with its CPU per task."""
    return {**summarize(*measured[name], digits=digits), **cpu.figures(name)}


def chunked_figures(rates: Sequence[float], cpu: CpuMeter,
                    native: dict[str, Any]) -> dict[str, Any]:
    """``chunked_record`` of the chunked side's burst ``rates``, with its CPU per task."""
    return chunked_record({**burst_summary(rates), **cpu.figures("chunked")}, native)


def chunked_record(chunked: dict[str, Any], native: dict[str, Any]) -> dict[str, Any]:
    """The ``ours_chunked`` / ``ratio_chunked`` keys of a result line (bench_celery's
    names, which ``run.py`` reads): the chunked side's figures and its throughput over
    native's, measured in the same run."""
    return {"ours_chunked": chunked,
            "ratio_chunked": {"throughput": ratio(chunked.get("throughput_per_s"),
                                                  native.get("throughput_per_s"))}}
