"""The ``wove-adapters`` command: demo, config, runs, result, doctor."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click


def _fail(exc: BaseException) -> click.ClickException:
    return click.ClickException(f"{type(exc).__name__}: {exc}")


@click.group()
@click.version_option(package_name="wove-adapters")
def main() -> None:
    """Hand Python tasks to the job systems you already run, and get the results back."""


@main.command("config")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="A wove_config.py or .toml file (default: discovered upwards from cwd).",
)
@click.option("--environment", default=None, help="Show only this environment.")
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml")
def config_cmd(config_file: str | None, environment: str | None, fmt: str) -> None:
    """Print the merged configuration and where every value came from."""
    from wove_adapters.core.config import load_config, render_config

    try:
        cfg = load_config(config_file=config_file)
        click.echo(render_config(cfg, environment=environment, fmt=fmt))
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        raise _fail(exc) from exc


@main.command("demo")
@click.option(
    "--environment",
    default=None,
    help="Run the mapped step in this configured environment "
    "(default: stdio worker processes, no server needed).",
)
@click.option("--items", default=50, show_default=True, help="Chunks in the mapped step.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
def demo_cmd(environment: str | None, items: int, config_file: str | None) -> None:
    """Run a small log-analytics pipeline: local steps + a mapped step on workers."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
    from rich.table import Table

    from wove_adapters import demo
    from wove_adapters.integration.hub import Hub

    console = Console()
    overrides: dict[str, Any] = {}
    if environment is None:
        environment = "demo-workers"
        overrides["environments"] = {"demo-workers": {"executor": "stdio"}}
    timings: list[tuple[str, str, int, list[float]]] = []
    try:
        hub = Hub(config_file=config_file, **overrides)
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    with hub:

        def timed(name: str, env: str, fn: Any, *args: Any) -> Any:
            start = time.perf_counter()
            value = hub.run(fn, *args, environment=env)
            timings.append((name, env, 1, [time.perf_counter() - start]))
            return value

        local = hub.config.default_environment
        lines = timed("generate_logs", local, demo.generate_logs)
        chunks = timed("split", local, demo.split, lines, items)
        parts: list[Any] = [None] * len(chunks)
        durations: list[float] = []
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task(f"parse_chunk on '{environment}'", total=len(chunks))
            started = time.perf_counter()
            futures = []
            for index, chunk in enumerate(chunks):
                future = hub.submit(demo.parse_chunk, chunk, environment=environment)
                future.add_done_callback(lambda _f: progress.advance(bar))
                futures.append((index, future, time.perf_counter()))
            for index, future, submitted in futures:
                try:
                    parts[index] = future.result()
                except Exception as exc:
                    raise _fail(exc) from exc
                durations.append(time.perf_counter() - submitted)
            wall = time.perf_counter() - started
        timings.append(("parse_chunk (mapped)", environment, len(chunks), durations))
        rows = timed("merge", local, demo.merge, parts)

    table = Table(title="Requests by endpoint")
    for column in ("endpoint", "requests", "error rate", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "endpoint" else "left")
    for row in rows:
        table.add_row(
            row["endpoint"],
            str(row["requests"]),
            f"{row['error_rate']:.2%}",
            f"{row['p50_ms']:.1f}",
            f"{row['p95_ms']:.1f}",
        )
    console.print(table)
    timing = Table(title="Task timings")
    for column in ("task", "environment", "runs", "total s", "p50 s", "max s"):
        timing.add_column(column, justify="left" if column in ("task", "environment") else "right")
    for name, env, runs, values in timings:
        ordered = sorted(values)
        timing.add_row(
            name,
            env,
            str(runs),
            f"{sum(values):.3f}",
            f"{ordered[len(ordered) // 2]:.3f}",
            f"{ordered[-1]:.3f}",
        )
    console.print(timing)
    workers = {part["pid"] for part in parts}
    console.print(
        f"mapped step: {len(chunks)} runs on {len(workers)} worker process(es) in {wall:.2f}s"
    )


@main.command("runs")
@click.option("--ledger", default=None, help="Ledger URL (default: the configured one).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--limit", default=50, show_default=True)
@click.option("--state", default=None, help="Only runs in this state.")
def runs_cmd(ledger: str | None, fmt: str, limit: int, state: str | None) -> None:
    """List recorded runs, newest first."""
    import asyncio

    from wove_adapters.core.ledger import open_ledger

    url = ledger or _configured_ledger()
    records = asyncio.run(open_ledger(url).list_runs(limit=limit, state=state))
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "run_id": r.run_id,
                        "environment": r.environment,
                        "task_id": r.task_id,
                        "adapter": r.adapter,
                        "idempotency_key": r.idempotency_key,
                        "attempt": r.attempt,
                        "state": r.state,
                        "submission": r.submission,
                        "has_outcome": r.outcome is not None,
                        "created_at": r.created_at,
                        "updated_at": r.updated_at,
                    }
                    for r in records
                ],
                indent=2,
            )
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Runs in {open_ledger(url).url}")
    for column in ("run id", "task", "environment", "adapter", "attempt", "state", "outcome"):
        table.add_column(column)
    for r in records:
        table.add_row(
            r.run_id,
            r.task_id,
            r.environment,
            r.adapter,
            str(r.attempt),
            r.state,
            "yes" if r.outcome is not None else "",
        )
    Console().print(table)


@main.command("result")
@click.argument("run_id")
@click.option("--ledger", default=None, help="Ledger URL (default: the configured one).")
@click.option(
    "--wait",
    "wait",
    type=float,
    default=None,
    help="Seconds to wait for an outcome that is not recorded yet.",
)
def result_cmd(run_id: str, ledger: str | None, wait: float | None) -> None:
    """Print a run's recorded result (exit 1 if the task failed or was cancelled)."""
    from wove_adapters.integration.hub import Hub

    with Hub() as hub:
        try:
            value = hub.result(run_id, ledger=ledger or _configured_ledger(), timeout=wait)
        except (KeyError, TimeoutError) as exc:
            raise _fail(exc) from exc
        except BaseException as exc:
            click.echo(f"run {run_id} failed: {type(exc).__name__}: {exc}", err=True)
            sys.exit(1)
    try:
        click.echo(json.dumps(value))
    except TypeError:
        click.echo(repr(value))


@main.command("doctor")
@click.option(
    "--environment",
    "environments",
    multiple=True,
    help="Check only these environments (default: every configured one).",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds for the probe task.")
def doctor_cmd(environments: tuple[str, ...], config_file: str | None, timeout: float) -> None:
    """Check each environment: library installed, backend reachable, a worker answers."""
    from rich.console import Console
    from rich.table import Table

    from wove_adapters.core import loop as shared_loop
    from wove_adapters.integration.hub import Hub

    table = Table(title="wove-adapters doctor")
    for column in ("environment", "check", "ok", "detail"):
        table.add_column(column)
    failed = False
    with Hub(config_file=config_file) as hub:
        names = list(environments) or sorted(hub.config.environments)
        for name in names:
            rows: list[tuple[str, bool, str]] = []
            try:
                dispatcher = hub.dispatcher(name)
                rows.append(("executor starts", True, dispatcher.transport.name))
                adapter = getattr(dispatcher.transport, "adapter", None)
                if adapter is not None:
                    rows.extend(shared_loop.run_sync(adapter.doctor(), timeout))
                receiver = getattr(dispatcher.transport, "receiver", None)
                if receiver is not None:
                    rows.append(("return path", True, receiver.url.split("/wove/events/")[0]))
                start = time.perf_counter()
                future = hub.submit(_probe, 1, environment=name)
                value = future.result(timeout=timeout)
                rows.append(
                    (
                        "probe task round trip",
                        value == 2,
                        f"{(time.perf_counter() - start) * 1000:.1f} ms",
                    )
                )
            except Exception as exc:
                rows.append(("environment", False, f"{type(exc).__name__}: {exc}"))
            for check, ok, detail in rows:
                failed |= not ok
                table.add_row(name, check, "[green]ok[/]" if ok else "[red]FAIL[/]", detail)
    Console().print(table)
    if failed:
        sys.exit(1)


@main.command("bench")
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="Only this backend (repeatable): process, stdio, celery, rq, arq, taskiq, dask, "
    "ray, temporal, ... (default: every backend with a benchmark script).",
)
@click.option("--quick", is_flag=True, help="Fewer tasks: 50 sequential, bursts of 200.")
@click.option("--no-wove", is_flag=True, help="Skip wove 2.x's own adapters.")
@click.option("--skip-footprint", is_flag=True, help="Skip the memory and payload-size runs.")
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where benchmarks.json, benchmarks.md and the charts go (default: docs/).",
)
@click.option(
    "--source",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="The wove-adapters source checkout holding benchmarks/ (default: found from "
    "the working directory, then from this package).",
)
def bench_cmd(
    backends: tuple[str, ...],
    quick: bool,
    no_wove: bool,
    skip_footprint: bool,
    output_dir: str | None,
    source: str | None,
) -> None:
    """Benchmark each backend: native vs ours vs wove's adapter; write docs/benchmarks.*."""
    import subprocess
    from pathlib import Path

    import wove_adapters

    candidates = [Path(source)] if source else [
        Path.cwd(),
        *Path.cwd().parents,
        Path(wove_adapters.__file__).resolve().parent.parent,
    ]
    runner = next(
        (
            c / "benchmarks" / "run.py"
            for c in candidates
            if (c / "benchmarks" / "run.py").exists() and (c / "wove_adapters").is_dir()
        ),
        None,
    )
    if runner is None:
        raise click.ClickException(
            "benchmarks/run.py was not found: the benchmarks ship with the source, not the "
            "wheel. Run this from a wove-adapters checkout (or pass --source PATH)."
        )
    argv = [sys.executable, str(runner)]
    for backend in backends:
        argv += ["--backend", backend]
    argv += [flag for flag, on in (("--quick", quick), ("--no-wove", no_wove),
                                   ("--skip-footprint", skip_footprint)) if on]
    if output_dir:
        argv += ["--output-dir", output_dir]
    sys.exit(subprocess.call(argv, cwd=runner.parent.parent))


def _probe(x: int) -> int:
    return x + 1


def _configured_ledger() -> str | None:
    from wove_adapters.core.config import load_config

    try:
        return load_config().ledger
    except Exception:
        return None


if __name__ == "__main__":
    main()
