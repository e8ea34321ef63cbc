"""Run the benchmark suite and publish ``docs/benchmarks.json`` and ``docs/benchmarks.md``.

    python benchmarks/run.py [--backend X ...] [--quick]      (or: wove-adapters bench)

For every selected backend, one after the other (never two at once: they share the CPU):

1. ``benchmarks/bench_<backend>.py``, the adapter's own script (native vs ours,
   interleaved), in that backend's tox environment (``.tox/<backend>/bin/python``; built
   with ``tox -e <backend> --notest`` when missing, because arq pins ``redis<6`` and cannot
   share an environment with celery, rq and taskiq). ``process`` and ``stdio`` need no
   server and run in this interpreter.
2. ``benchmarks/bench_wove_<backend>.py`` in the same environment: native vs ours vs wove
   2.0.3's built-in adapter for the backend, interleaved in one run (or why wove's adapter
   cannot run).

Each script prints JSON lines; this runner merges them per backend and computes
``ours_native_p50`` / ``ours_native_throughput`` and ``ours_chunked_native_throughput``
(``Hub.map`` with chunking, where the script measures it; all from the adapter script's
interleaved run) and ``ours_wove_p50`` / ``ours_wove_throughput`` (from the three-way run): every
ratio comes from one run in which its two sides took turns, so machine noise cancels.
``--quick`` runs fewer tasks (50 sequential, bursts of 200, one round) for a fast check.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import machine, ratio  # noqa: E402

# Everything that may have a benchmark, in the order they run and are shown.
BACKENDS = ("process", "stdio", "celery", "rq", "arq", "taskiq", "dask", "ray", "temporal",
            "slurm", "aws_batch", "kubernetes")
LOCAL = {"process", "stdio"}  # no server, no extra: the runner's own interpreter
# Flags the scripts use for the same three knobs (read from each script's --help).
SEQ_FLAGS = ("--seq", "--n", "--tasks")
QUICK = {"seq": 50, "burst": 200, "rounds": 1}
TARGET_P50 = 1.10
TARGET_THROUGHPUT = 0.90
# Issue 16: Hub.map with chunking (K runs per backend message) against native's one task
# per message, measured in the same run.
TARGET_CHUNKED_THROUGHPUT = 3.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- environments


def tox_command() -> list[str]:
    beside = Path(sys.executable).parent / "tox"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("tox")
    return [found] if found else [sys.executable, "-m", "tox"]


def env_python(backend: str, *, sync: bool) -> tuple[str | None, str]:
    """The interpreter for a backend's scripts, building its tox env if needed."""
    if backend in LOCAL:
        return sys.executable, "this interpreter"
    python = ROOT / ".tox" / backend / "bin" / "python"
    if sync or not python.exists():
        log(f"[{backend}] building its environment: tox -e {backend} --notest")
        done = subprocess.run([*tox_command(), "-e", backend, "--notest"], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode != 0 or not python.exists():
            return None, (f"`tox -e {backend} --notest` failed: "
                          f"{(done.stdout + done.stderr)[-1500:]}")
    return str(python), f".tox/{backend}"


def env_versions(python: str) -> dict[str, str]:
    code = ("import sys, json; sys.path.insert(0, 'benchmarks'); import common; "
            "print(json.dumps({'python': sys.version.split()[0], **common.versions()}))")
    with contextlib.suppress(Exception):
        done = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))
    return {}


# ---------------------------------------------------------------- running scripts


def script_flags(python: str, script: Path) -> set[str]:
    done = subprocess.run([python, str(script), "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", done.stdout))


def quick_args(flags: set[str]) -> list[str]:
    args: list[str] = []
    seq_flag = next((f for f in SEQ_FLAGS if f in flags), None)
    if seq_flag:
        args += [seq_flag, str(QUICK["seq"])]
    if "--burst" in flags:
        args += ["--burst", str(QUICK["burst"])]
    if "--rounds" in flags:
        args += ["--rounds", str(QUICK["rounds"])]
    if "--warmup" in flags:
        args += ["--warmup", "5"]
    return args


def script_args(backend: str, flags: set[str], args: argparse.Namespace) -> list[str]:
    """Arguments for one script: its defaults (>= 200 sequential tasks, bursts of 1000)
    unless ``--quick``; the switches this runner passes through where a script has them."""
    extra: list[str] = []
    if args.quick:
        if backend == "process":  # one interpreter per task: keep the quick run short
            extra += ["--seq", "30", "--burst", "40", "--rounds", "1"]
        else:
            extra += quick_args(flags)
        if "--weave-samples" in flags:
            extra += ["--weave-samples", "2"]
    if args.no_wove and "--no-wove" in flags:
        extra.append("--no-wove")
    if args.skip_footprint and "--skip-footprint" in flags:
        extra.append("--skip-footprint")
    return extra


def run_script(python: str, script: Path, args: list[str], log_path: Path,
               timeout: float) -> tuple[list[dict[str, Any]], str | None, float]:
    """Run one script; its JSON lines, an error (or None) and its wall time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "WOVE_ADAPTERS_HOME": tempfile.mkdtemp(prefix="wove-bench-home-")}
    command = [python, str(script.relative_to(ROOT)), *args]
    log(f"    $ {' '.join(command)}")
    started = time.monotonic()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # SIGINT first: the scripts' ``finally`` blocks stop the workers, clusters and
            # servers they started (in their own sessions); SIGKILL if that hangs too.
            proc.send_signal(signal.SIGINT)
            try:
                stdout, _ = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, _ = proc.communicate()
            return _json_lines(stdout or ""), \
                f"timed out after {timeout:.0f}s (log: {log_path})", time.monotonic() - started
    elapsed = time.monotonic() - started
    lines = _json_lines(stdout or "")
    error = None
    if proc.returncode != 0 or not lines:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-12:]
        error = (f"exit code {proc.returncode}, {len(lines)} result line(s); log {log_path}: "
                 + " | ".join(tail))[-2000:]
    return lines, error, elapsed


def _json_lines(text: str) -> list[dict[str, Any]]:
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


# ---------------------------------------------------------------- merging


def figures(side: dict[str, Any] | None) -> dict[str, Any] | None:
    if not side:
        return None
    keep = ("p50_ms", "p99_ms", "throughput_per_s", "throughput_incl_settle_per_s",
            "caller_cpu_us_per_task", "worker_cpu_us_per_task")
    return {k: side[k] for k in keep if k in side}


def merge_adapter_lines(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Adapter-script lines -> per backend key: native, ours (default ``http`` return
    path), and other return paths as extras."""
    out: dict[str, dict[str, Any]] = {}
    for line in lines:
        name = line.get("backend")
        if not name or line.get("kind"):
            continue
        entry = out.setdefault(name, {"native": None, "ours": None, "ours_other": {}})
        path = line.get("return_path") or "http"
        if path == "http":
            entry["native"] = figures(line.get("native"))
            entry["ours"] = figures(line.get("ours"))
        if line.get("ours_chunked"):  # Hub.map with chunking, same run as native
            entry["chunked"] = figures(line["ours_chunked"])
        else:
            entry["ours_other"][f"return_path={path}"] = figures(line.get("ours"))
            if entry["native"] is None:
                entry["native"] = figures(line.get("native"))
        for key, value in line.items():  # e.g. celery's ours_redis_return_path
            if key.startswith("ours_") and key != "ours_chunked" and isinstance(value, dict) \
                    and "p50_ms" in value:
                entry["ours_other"][key.removeprefix("ours_")] = figures(value)
        for key, value in line.items():  # other measured sides, e.g. a native control
            if key not in ("native", "ours", "wove") and not key.startswith("ours_") \
                    and isinstance(value, dict) and ("p50_ms" in value or
                                                     "throughput_per_s" in value):
                entry["ours_other"][key] = figures(value)
        entry.setdefault("lines", []).append(line)
        for key in ("wove", "wove_note", "errors", "native_description",
                    "ours_description", "settings", "setup"):
            if key in line and line[key] not in (None, {}, ""):
                entry[key] = line[key]
    return out


def backend_record(adapter: dict[str, Any] | None, wove_line: dict[str, Any] | None,
                   *, three_way_only: bool) -> dict[str, Any]:
    """One ``backends.<name>`` entry of docs/benchmarks.json."""
    record: dict[str, Any] = {"native": None, "ours": None, "wove": None, "ratios": {}}
    if three_way_only and wove_line is not None:  # process, stdio: one script, one run
        record["native"] = figures(wove_line.get("native"))
        record["ours"] = figures(wove_line.get("ours"))
    elif adapter is not None and adapter.get("native") and adapter.get("ours"):
        record["native"] = adapter.get("native")
        record["ours"] = adapter.get("ours")
        if adapter.get("ours_other"):
            record["ours_other_paths"] = adapter["ours_other"]
        if adapter.get("chunked"):
            record["ours_chunked"] = adapter["chunked"]
        record["adapter_script_output"] = adapter.get("lines", [])
    elif wove_line is not None and wove_line.get("native") and wove_line.get("ours"):
        record["native"] = figures(wove_line.get("native"))
        record["ours"] = figures(wove_line.get("ours"))
        record["source_note"] = ("native and ours come from the three-way run: the adapter's "
                                 "own script gave no figures")
    wove_run_ours = None
    if wove_line is not None:
        record["wove"] = figures(wove_line.get("wove"))
        wove_run_ours = figures(wove_line.get("ours"))
        if not three_way_only and "source_note" not in record and (
                wove_line.get("native") or wove_run_ours):
            record["wove_run"] = {"native": figures(wove_line.get("native")),
                                  "ours": wove_run_ours, "wove": record["wove"]}
        if wove_line.get("wove_weave_per_task"):
            record["wove_weave_per_task"] = wove_line["wove_weave_per_task"]
        errors = wove_line.get("errors") or {}
        if errors:
            record["errors"] = errors
    if record["wove"] is None:
        note = (wove_line or {}).get("wove_note") or (adapter or {}).get("wove_note")
        record["wove_note"] = note or "no wove comparison was measured for this backend"
    elif wove_line is not None and wove_line.get("wove_note"):
        record["wove_note"] = wove_line["wove_note"]
    native, ours, wove = record["native"], record["ours"], record["wove"]
    record["ratios"] = {
        "ours_native_p50": ratio(_get(ours, "p50_ms"), _get(native, "p50_ms")),
        "ours_native_throughput": ratio(_get(ours, "throughput_per_s"),
                                        _get(native, "throughput_per_s")),
        "ours_wove_p50": ratio(_get(wove_run_ours, "p50_ms"), _get(wove, "p50_ms")),
        "ours_wove_throughput": ratio(_get(wove_run_ours, "throughput_per_s"),
                                      _get(wove, "throughput_per_s")),
        "ours_native_p99": ratio(_get(ours, "p99_ms"), _get(native, "p99_ms")),
        "ours_chunked_native_throughput": ratio(
            _get(record.get("ours_chunked"), "throughput_per_s"),
            _get(native, "throughput_per_s")),
    }
    r = record["ratios"]
    record["targets"] = {
        "p50_within_1.10x_native": None if r["ours_native_p50"] is None
        else r["ours_native_p50"] <= TARGET_P50,
        "throughput_at_least_0.9x_native": None if r["ours_native_throughput"] is None
        else r["ours_native_throughput"] >= TARGET_THROUGHPUT,
        f"chunked_throughput_at_least_{TARGET_CHUNKED_THROUGHPUT:g}x_native":
        None if r["ours_chunked_native_throughput"] is None
        else r["ours_chunked_native_throughput"] >= TARGET_CHUNKED_THROUGHPUT,
        "faster_than_wove": None if r["ours_wove_p50"] is None
        else (r["ours_wove_p50"] < 1.0 and (r["ours_wove_throughput"] or 0) > 1.0),
    }
    return record


def _get(side: dict[str, Any] | None, key: str) -> float | None:
    return None if not side else side.get(key)


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    selected = [b for b in BACKENDS if b in (args.backend or BACKENDS)]
    unknown = [b for b in selected if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="wove-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.timezone.utc)
    info = machine()
    log(f"machine: {info['cores']} cores, load {info['load_average_at_start']}, "
        f"python {info['python']}; logs in {logs}")
    result: dict[str, Any] = {
        "machine": info,
        "run": {"started_at": started_at.isoformat(timespec="seconds"),
                "quick": bool(args.quick),
                "command": "wove-adapters bench" + (" --quick" if args.quick else "")
                + "".join(f" --backend {b}" for b in args.backend or []),
                "targets": {"ours_native_p50_max": TARGET_P50,
                            "ours_native_throughput_min": TARGET_THROUGHPUT,
                            "ours_chunked_native_throughput_min":
                                TARGET_CHUNKED_THROUGHPUT}},
        "backends": {},
        "not_measured": {},
    }
    for backend in selected:
        adapter_script = HERE / f"bench_{backend}.py"
        wove_script = HERE / f"bench_wove_{backend}.py"
        three_way_only = backend in LOCAL
        if not adapter_script.exists() and not wove_script.exists():
            result["not_measured"][backend] = f"no benchmarks/bench_{backend}.py yet"
            continue
        if not three_way_only and not adapter_script.exists():
            result["not_measured"][backend] = f"no benchmarks/bench_{backend}.py yet"
            continue
        log(f"[{backend}]")
        python, where = env_python(backend, sync=args.sync_envs)
        if python is None:
            result["not_measured"][backend] = where
            continue
        load_before = [round(v, 2) for v in os.getloadavg()]
        versions = env_versions(python)
        adapter_lines: list[dict[str, Any]] = []
        wove_lines: list[dict[str, Any]] = []
        problems: list[str] = []
        commands: list[str] = []
        seconds = 0.0
        # process/stdio: their one script is a three-way run (read like a wove script).
        scripts = [(adapter_script, "wove")] if three_way_only else \
            [(adapter_script, "adapter"), (wove_script, "wove")]
        for script, kind in scripts:
            if not script.exists() or (kind == "wove" and args.no_wove and not three_way_only):
                continue
            extra = script_args(backend, script_flags(python, script), args)
            lines, error, elapsed = run_script(
                python, script, extra, logs / f"{script.stem}.log", args.timeout)
            seconds += elapsed
            commands.append(" ".join([where + "/bin/python" if backend not in LOCAL
                                      else "python", f"benchmarks/{script.name}", *extra]))
            (adapter_lines if kind == "adapter" else wove_lines).extend(lines)
            if error:
                problems.append(f"{script.name}: {error}")
                log(f"    ! {error[:300]}")
        for line in wove_lines:
            if line.get("kind") == "memory":
                result["memory"] = line
            elif line.get("kind") == "wire":
                result["wire_bytes"] = line["sizes"]
                if line.get("inline_limits"):
                    result["inline_payload_limits"] = line["inline_limits"]
        merged = merge_adapter_lines(adapter_lines)
        wove_by_key = {line["backend"]: line for line in wove_lines
                       if line.get("backend") and not line.get("kind")}
        keys = list(merged) or list(wove_by_key)
        for key in keys:
            wove_line = wove_by_key.get(key)
            if wove_line is None and len(wove_by_key) == 1 and len(keys) == 1:
                wove_line = next(iter(wove_by_key.values()))
            record = backend_record(merged.get(key), wove_line, three_way_only=three_way_only)
            if record["native"] is None and record["ours"] is None:
                continue
            record.update({
                "environment": where,
                "versions": versions,
                "load_average_before": load_before,
                "commands": commands,
                "seconds": round(seconds, 1),
            })
            if problems:
                record["problems"] = problems
            result["backends"][key] = record
            r = record["ratios"]
            log(f"    {key}: ours/native p50 {r['ours_native_p50']}, throughput "
                f"{r['ours_native_throughput']}, chunked throughput "
                f"{r['ours_chunked_native_throughput']}; ours/wove p50 {r['ours_wove_p50']}, "
                f"throughput {r['ours_wove_throughput']}")
        if not any(k in result["backends"] for k in keys):
            why = "; ".join(problems) or "no figures were produced"
            notes = [line["wove_note"] for line in wove_by_key.values() if line.get("wove_note")]
            if notes:
                why += " | wove: " + " ".join(notes)
            result["not_measured"][backend] = why
    result["run"]["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds")
    result["run"]["logs"] = str(logs)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=BACKENDS,
                        help="only this backend (repeatable; default: every one with a script)")
    parser.add_argument("--quick", action="store_true",
                        help=f"fewer tasks: {QUICK['seq']} sequential, bursts of "
                             f"{QUICK['burst']}, {QUICK['rounds']} round")
    parser.add_argument("--no-wove", action="store_true", help="skip wove's adapters")
    parser.add_argument("--skip-footprint", action="store_true",
                        help="skip the memory and payload-size measurements")
    parser.add_argument("--sync-envs", action="store_true",
                        help="run `tox -e <backend> --notest` even if the env exists")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per script before it is stopped (default: 3600, "
                             "900 with --quick)")
    parser.add_argument("--output-dir", default=str(ROOT / "docs"),
                        help="where benchmarks.json, benchmarks.md and charts go")
    parser.add_argument("--log-dir", default=None, help="script logs (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the JSON instead of writing the docs")
    args = parser.parse_args(argv)
    if args.timeout is None:
        args.timeout = 900.0 if args.quick else 3600.0
    result = run(args)
    if args.no_write:
        print(json.dumps(result, indent=2))
        return 0 if result["backends"] else 1
    from report import write_all

    out = Path(args.output_dir)
    if args.backend:  # a partial run updates only its backends in the published files
        result = merge_partial(out / "benchmarks.json", result, args.backend)
    paths = write_all(result, out)
    for path in paths:
        log(f"wrote {path}")
    return 0 if result["backends"] else 1


def _selected(key: str, backends: list[str]) -> bool:
    return key.split("+")[0] in backends or any(key.startswith(b) for b in backends)


def merge_partial(previous: Path, result: dict[str, Any], backends: list[str]) -> dict[str, Any]:
    """Fold a run of some backends into the published run: their rows are replaced, the
    others kept; the published machine and run stay, and this run is listed under
    ``run.updates`` (each backend's row carries its own load average and versions)."""
    try:
        old = json.loads(previous.read_text())
    except (OSError, ValueError):
        return result
    merged = dict(old)
    merged["backends"] = {}
    for name, record in old.get("backends", {}).items():
        if not _selected(name, backends):
            merged["backends"][name] = record
    merged["backends"].update(result["backends"])
    order = {b: i for i, b in enumerate(BACKENDS)}
    seen = [*old.get("backends", {}), *result["backends"]]
    merged["backends"] = dict(sorted(
        merged["backends"].items(),
        key=lambda kv: (order.get(next((b for b in BACKENDS if kv[0].startswith(b)), ""),
                                  len(order)), seen.index(kv[0]))))
    not_measured = {k: v for k, v in old.get("not_measured", {}).items() if k not in backends}
    not_measured.update(result["not_measured"])
    merged["not_measured"] = not_measured
    for key in ("memory", "wire_bytes", "inline_payload_limits"):
        if key in result:
            merged[key] = result[key]
    run_info = dict(old.get("run", {}))
    run_info["targets"] = result["run"]["targets"]  # the targets this code checks
    run_info["updates"] = [*run_info.get("updates", []), {
        "command": result["run"]["command"],
        "started_at": result["run"]["started_at"],
        "finished_at": result["run"].get("finished_at"),
        "load_average_at_start": result["machine"]["load_average_at_start"],
        "backends": backends,
    }]
    merged["run"] = run_info
    return merged


if __name__ == "__main__":
    sys.exit(main())
