"""The ``wove-adapters`` command: demo, config, runs, result, doctor, serve, ui, bench."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import click

from wove_adapters.core.ledger.base import STATES, TERMINAL_STATES


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
@click.option(
    "--task",
    default=None,
    help="Show this task's resolved settings (tasks.NAME over its environment over "
    "task_defaults over the top level) and where each came from.",
)
@click.option("--format", "fmt", type=click.Choice(["toml", "json"]), default="toml")
def config_cmd(
    config_file: str | None, environment: str | None, task: str | None, fmt: str
) -> None:
    """Print the merged configuration and where every value came from."""
    from wove_adapters.core.config import load_config, render_config
    from wove_adapters.core.task_settings import render_task

    try:
        cfg = load_config(config_file=config_file)
        if task is None:
            click.echo(render_config(cfg, environment=environment, fmt=fmt))
        else:
            click.echo(render_task(cfg, task, environment=environment, fmt=fmt))
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    if task is not None and task not in cfg.tasks:  # a typo would look like defaults
        known = ", ".join(sorted(cfg.tasks)) or "none"
        click.echo(f"note: no tasks.{task} table is configured (configured tasks: {known}); "
                   "these are the settings any task of that name gets", err=True)
    problems = _executor_config_problems(cfg, environment, task)
    if problems:  # printed after the values, so the key's source is on screen
        raise click.ClickException("\n".join(problems))


def _executor_config_problems(
    cfg: Any, environment: str | None, task: str | None = None
) -> list[str]:
    """Each environment's (and task table's) ``executor_config`` checked against its
    executor's declared keys, as an environment start checks it; no backend imported."""
    from wove_adapters.integration.executor_config import check_settings

    if task is not None:
        resolved = cfg.task_settings(task, environment=environment)
        settings = [(resolved["environment"], resolved)]
    else:
        settings = [(name, cfg.environment_settings(name))
                    for name in ([environment] if environment else sorted(cfg.environments))]
    if environment is None and task is None:
        for task in sorted(cfg.tasks):
            resolved = cfg.task_settings(task)
            settings.append((resolved["environment"], resolved))
    problems: dict[str, None] = {}
    for name, resolved in settings:
        try:
            check_settings(name, resolved)
        except ValueError as exc:  # ExecutorConfigError, or an unknown executor
            problems[f"{type(exc).__name__}: {exc}"] = None
    return list(problems)


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

    from wove_adapters import demo
    from wove_adapters.integration.hub import Hub

    console = Console()
    overrides: dict[str, Any] = {}
    if environment is None:
        environment = "demo-workers"
        overrides["environments"] = {"demo-workers": {"executor": "stdio"}}
    steps: list[_StepTiming] = []
    try:
        hub = Hub(config_file=config_file, **overrides)
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    with hub:

        def step(env: str, fn: Any, *args: Any) -> Any:
            submitted = time.time()
            try:
                out = hub.run(demo.timed, fn, *args, environment=env,
                              task_options={"task_name": fn.__name__})
            except Exception as exc:
                raise _fail(exc) from exc
            steps.append(_StepTiming(fn.__name__, env, time.time() - submitted,
                                     [out["run_s"]], [out["started_at"] - submitted]))
            return out["value"]

        local = hub.config.default_environment
        lines = step(local, demo.generate_logs)
        chunks = step(local, demo.split, lines, items)
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            bar = progress.add_task(f"parse_chunk on '{environment}'", total=len(chunks))
            started = time.time()
            futures = []
            for chunk in chunks:
                submitted = time.time()
                future = hub.submit(demo.timed, demo.parse_chunk, chunk,
                                    environment=environment,
                                    task_options={"task_name": "parse_chunk"})
                future.add_done_callback(lambda _f: progress.advance(bar))
                futures.append((future, submitted))
            outs = []
            for future, submitted in futures:
                try:
                    out = future.result()
                except Exception as exc:
                    raise _fail(exc) from exc
                outs.append((out, submitted))
            wall = time.time() - started
        steps.append(_StepTiming(
            "parse_chunk", environment, wall,
            [out["run_s"] for out, _ in outs],
            [out["started_at"] - submitted for out, submitted in outs],
        ))
        rows = step(local, demo.merge, [out["value"] for out, _ in outs])

    console.print(_endpoint_table(rows))
    console.print(_timing_table(steps))
    workers = {out["pid"] for out, _ in outs}
    console.print(
        f"mapped step: {len(chunks)} runs on {len(workers)} worker process(es), "
        f"{wall:.2f} s wall time"
    )


class _StepTiming:
    """One pipeline step: its wall time as the caller saw it, and per run the time the
    task ran on its worker and the time it waited before starting."""

    def __init__(self, name: str, environment: str, wall: float, run: list[float],
                 wait: list[float]) -> None:
        self.name = name
        self.environment = environment
        self.wall = wall
        self.run = sorted(run)
        self.wait = sorted(max(0.0, w) for w in wait)  # clocks of two processes


def _endpoint_table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title="Requests by endpoint")
    for column in ("endpoint", "requests", "5xx share", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right" if column != "endpoint" else "left")
    for row in rows:
        table.add_row(
            row["endpoint"],
            str(row["requests"]),
            f"{row['error_rate']:.2%}",
            f"{row['p50_ms']:.1f}",
            f"{row['p95_ms']:.1f}",
        )
    return table


# Two-line headers keep the table inside 80 columns (a non-terminal's width) uncut.
TIMING_COLUMNS = ("step", "environment", "runs", "wall\ns", "run\np50 ms", "run\nmax ms",
                  "wait\np50 ms", "wait\nmax ms")


def _timing_table(steps: list[_StepTiming]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        title="Task timings",
        caption="wall: the step as the caller saw it, from submit to its last result.\n"
        "run: each task's time on its worker.\n"
        "wait: from submit to the task starting on its worker (queue, transfer).",
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
    )
    for column in TIMING_COLUMNS:
        left = column in ("step", "environment")
        # fold, never "…": a cut number reads as a different number.
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    for s in steps:
        table.add_row(
            s.name,
            s.environment,
            str(len(s.run)),
            f"{s.wall:.3f}",
            f"{s.run[len(s.run) // 2] * 1000:.1f}",
            f"{s.run[-1] * 1000:.1f}",
            f"{s.wait[len(s.wait) // 2] * 1000:.1f}",
            f"{s.wait[-1] * 1000:.1f}",
        )
    return table


# ---------------------------------------------------------------- runs

#: The task id ``doctor`` gives its probe runs, so ``runs`` can leave them out.
PROBE_TASK = "wove-adapters-doctor-probe"


def _is_probe(record: Any) -> bool:
    return bool(record.task_id == PROBE_TASK)


async def _list_visible(ledger: Any, limit: int, state: str | None, everything: bool) -> tuple[
    list[Any], int
]:
    """The newest ``limit`` runs, doctor probes left out unless ``everything``; returns
    them and how many probes were hidden. Asks for more rows while probes fill the page,
    because the ledger cannot leave one task id out."""
    if everything or limit <= 0:
        return await ledger.list_runs(limit=limit, state=state), 0
    want = limit
    while True:
        records = await ledger.list_runs(limit=want, state=state)
        shown = [r for r in records if not _is_probe(r)]
        if len(shown) >= limit or len(records) < want or want >= limit * 16:
            return shown[:limit], sum(1 for r in records if _is_probe(r))
        want *= 4


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Plain, left-aligned columns. Nothing is ever cut: a run id must paste whole into
    ``wove-adapters result``, so a line wider than the terminal wraps instead."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


@main.command("runs")
@click.option("--ledger", default=None, help="Ledger URL (default: the configured one).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option("--limit", default=50, show_default=True)
@click.option("--state", default=None, type=click.Choice(list(STATES)),
              help="Only runs in this state.")
@click.option("--all", "everything", is_flag=True,
              help=f"Include the probe runs of `wove-adapters doctor` (task {PROBE_TASK}).")
def runs_cmd(ledger: str | None, fmt: str, limit: int, state: str | None,
             everything: bool) -> None:
    """List recorded runs, newest first, with whole run ids (paste one into `result`)."""
    import asyncio

    from wove_adapters.core.ledger import open_ledger

    try:
        store = open_ledger(ledger or _configured_ledger())
        records, hidden = asyncio.run(_list_visible(store, limit, state, everything))
    except (KeyError, ValueError, OSError) as exc:
        raise _Exit(f"cannot read the ledger {ledger or 'configured'}: "
                    f"{type(exc).__name__}: {exc}", EXIT_UNREADABLE) from exc
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
    click.echo(f"runs in {store.url}, newest first")
    if not records:
        click.echo("(none)")
    else:
        now = time.time()
        rows: list[tuple[str, ...]] = [
            ("RUN ID", "STATE", "ENVIRONMENT", "ADAPTER", "ATTEMPT", "CREATED", "OUTCOME")
        ]
        rows += [
            (r.run_id, r.state, r.environment, r.adapter or "-", str(r.attempt),
             _age(now - r.created_at), "kept" if r.outcome is not None else "-")
            for r in records
        ]
        for line in _columns(rows):
            click.echo(line)
    if hidden:
        click.echo(f"({hidden} doctor probe run(s) hidden: --all shows them)")


# ---------------------------------------------------------------- result

# Exit codes of `wove-adapters result`, one per answer (documented in docs/ledger.md).
EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_NOT_FOUND = 2  # also: an ambiguous prefix, a bad option (click's usage errors)
EXIT_CANCELLED = 3
EXIT_TIMED_OUT = 4
EXIT_LOST = 5
EXIT_IN_FLIGHT = 6
EXIT_UNREADABLE = 7

#: How many of the newest runs a prefix is matched against (the ledger has no prefix
#: query, so a longer scan would read every row).
PREFIX_SCAN = 5000


class _Exit(click.ClickException):
    """A ClickException with our own exit code (click prints ``Error: message``)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        setattr(self, "exit_code", code)  # noqa: B010 (a ClassVar on ClickException)


async def _find_run(ledger: Any, ref: str) -> Any:
    """The run whose id is ``ref``, else the one run whose id (or the part after the task
    name) starts with ``ref``. Unknown and ambiguous references exit 2, naming the fix."""
    record = await ledger.get(ref)
    if record is not None:
        return record
    if not ref.strip():
        raise _Exit("give a run id (or a unique prefix of one)", EXIT_NOT_FOUND)
    candidates = [
        r for r in await ledger.list_runs(limit=PREFIX_SCAN)
        if r.run_id.startswith(ref) or r.run_id.partition(":")[2].startswith(ref)
    ]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise _Exit(
            f"no run {ref!r} in {ledger.url} (looked for that id, and for a prefix among the "
            f"newest {PREFIX_SCAN} runs). `wove-adapters runs` lists the runs; pass "
            f"--ledger URL if the run was recorded in another ledger.",
            EXIT_NOT_FOUND,
        )
    shown = "\n  ".join(f"{r.run_id}  ({r.state})" for r in candidates[:20])
    more = f"\n  ... and {len(candidates) - 20} more" if len(candidates) > 20 else ""
    raise _Exit(
        f"{ref!r} is ambiguous: it starts {len(candidates)} run ids; give more of the id.\n"
        f"  {shown}{more}",
        EXIT_NOT_FOUND,
    )


async def _await_answer(ledger: Any, ref: str, wait: float) -> Any:
    """The run's record once it is terminal (or has an outcome), or as it stands after
    ``wait`` seconds. Terminal rows answer at once, outcome blob or not."""
    record = await _find_run(ledger, ref)
    deadline = time.monotonic() + max(wait, 0.0)
    pause = 0.05
    while record.state not in TERMINAL_STATES and record.outcome is None:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 1.5, 0.5)
        record = await ledger.get(record.run_id) or record
    return record


def _answer(record: Any) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) for a run's record: the word that names its outcome,
    then what the ledger knows about it."""
    from wove_adapters.core import frames
    from wove_adapters.core.codec import decode_outcome
    from wove_adapters.core.ledger.base import CANCELLED, FAILED, LOST, SUCCEEDED
    from wove_adapters.integration.environments import trusted_key_id

    run = f"run {record.run_id}"
    if record.state not in TERMINAL_STATES and record.outcome is None:
        hint = ("it was detached: its worker still runs it" if record.state == "detached"
                else "it has no outcome yet")
        return (EXIT_IN_FLIGHT, "",
                f"{run} is still {record.state} ({hint}); wait for it with --wait SECONDS")
    frame: dict[str, Any] | None = None
    if record.outcome is not None:
        try:
            frame = decode_outcome(record.outcome, record.run_id,
                                   key_id=trusted_key_id(_config_or_none(), record.environment))
        except Exception as exc:  # an unverifiable or unloadable outcome is its own answer
            return (EXIT_UNREADABLE, "",
                    f"{run} is {record.state}, but its recorded outcome cannot be read: "
                    f"{type(exc).__name__}: {exc}. A bad signature means the signing key "
                    f"is not this machine's (set WOVE_ADAPTERS_SECRET); a missing module "
                    f"means the result's type must be importable here.")
    kind = frame.get("type") if frame else None
    error: dict[str, Any] = (frame or {}).get("error") or {}
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.updated_at))
    if record.state == LOST or error.get("source") == "orphan":
        reason = error.get("message") or (frame or {}).get("reason")
        return (EXIT_LOST, "", f"{run} lost: "
                + (reason or f"the ledger records no reason (marked lost at {when})"))
    if kind == frames.TASK_RESULT or (kind is None and record.state == SUCCEEDED):
        if frame is None:
            return (EXIT_SUCCEEDED, "",
                    f"{run} succeeded; its value was not kept (the ledger keeps values of "
                    f"runs with an idempotency key or delivery_orphan_policy 'detach')")
        value = frame.get("result")
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
        return (EXIT_SUCCEEDED, text, "")
    if kind == frames.TASK_CANCELLED or (kind is None and record.state == CANCELLED):
        reason = (frame or {}).get("reason") or f"no reason recorded (cancelled at {when})"
        return (EXIT_CANCELLED, "", f"{run} cancelled: {reason}")
    if error.get("source") == "timeout" or error.get("kind") == "DeliveryTimeoutError":
        return (EXIT_TIMED_OUT, "", f"{run} timed out: {error.get('message', '')}")
    if kind is None:
        assert record.state == FAILED
        return (EXIT_FAILED, "",
                f"{run} failed; the ledger recorded the state without the error (it keeps "
                f"errors of runs with an idempotency key or delivery_orphan_policy 'detach')")
    text = f"{run} failed: {error.get('kind', 'Error')}: {error.get('message', '')}"
    remote = str(error.get("traceback") or "").rstrip()
    if remote:
        where = error.get("source") or "task"
        text += f"\n\nremote traceback ({where}):\n{remote}"
    return (EXIT_FAILED, "", text)


@main.command("result")
@click.argument("run_id")
@click.option("--ledger", default=None, help="Ledger URL (default: the configured one).")
@click.option(
    "--wait",
    "wait",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to wait while the run is still in flight (`inf`: until it ends).",
)
def result_cmd(run_id: str, ledger: str | None, wait: float) -> None:
    """Print a run's outcome. RUN_ID may be a unique prefix of the id.

    \b
    A finished run answers at once; one still in flight is waited for up to --wait.
    Exit codes:
      0 succeeded (the value on stdout, JSON when it can be)
      1 failed (type: message, then the remote traceback, on stderr)
      2 no such run, or an ambiguous prefix (the candidates are listed)
      3 cancelled (with the reason)
      4 timed out (delivery_timeout)
      5 lost (with the reason)
      6 still in flight when --wait ran out
      7 the ledger or the recorded outcome could not be read
    """
    from wove_adapters.core.ledger import open_ledger

    try:
        store = open_ledger(ledger or _configured_ledger())
        record = asyncio.run(_await_answer(store, run_id, wait))
    except click.ClickException:
        raise
    except Exception as exc:
        raise _Exit(f"cannot read the ledger {ledger or '(configured)'}: "
                    f"{type(exc).__name__}: {exc}", EXIT_UNREADABLE) from exc
    code, out, err = _answer(record)
    if out:
        click.echo(out)
    if err:
        click.echo(err, err=True)
    sys.exit(code)


# ---------------------------------------------------------------- doctor

_MARK = {True: ("ok", "green"), False: ("FAIL", "red"), None: ("skip", "yellow")}


@main.command("doctor")
@click.option(
    "--environment",
    "environments",
    multiple=True,
    help="Check only these environments (default: every configured one).",
)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None)
@click.option("--timeout", default=30.0, show_default=True,
              help="Seconds for the probe task (and for the backend checks).")
def doctor_cmd(environments: tuple[str, ...], config_file: str | None, timeout: float) -> None:
    """Check each environment: library installed, backend reachable, a worker answers.

    The probe task is sent only when every other check passed, so a queue nobody
    consumes gets an answer in seconds and no stray probe message. Probe runs are
    recorded under the task id wove-adapters-doctor-probe and hidden from `runs`.
    """
    from wove_adapters.integration.hub import Hub

    failed = False
    try:
        hub = Hub(config_file=config_file)
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        raise _fail(exc) from exc
    import os

    from wove_adapters.worker.serve import SERVE_URL_ENV, probe_health

    serve_url = os.environ.get(SERVE_URL_ENV)
    if serve_url:
        probe, reached, said = probe_health(serve_url, timeout)
        failed |= not reached
        click.echo(f"service {serve_url} (${SERVE_URL_ENV})")
        click.echo(f"  {click.style(_MARK[reached][0].ljust(4), fg=_MARK[reached][1])}  "
                   f"{probe}: {said}")
    with hub:
        names = list(environments) or sorted(hub.config.environments)
        for name in names:
            rows = _doctor_rows(hub, name, timeout)
            executor = next((d for c, ok, d in rows if c == "executor starts" and ok),
                            _configured_executor(hub.config, name))
            click.echo(f"environment '{name}' ({executor})")
            for check, ok, detail in rows:
                failed |= ok is False
                word, colour = _MARK[ok]
                # Plain lines, never a fixed-width table: a fix hint is a command to
                # copy, so it must never be cut at a narrow terminal.
                click.echo(f"  {click.style(word.ljust(4), fg=colour)}  {check}: {detail}")
    if failed:
        click.echo("doctor: some checks failed; each FAIL line says what to do")
        sys.exit(1)
    click.echo("doctor: every check passed")


def _configured_executor(cfg: Any, name: str) -> str:
    """The executor an environment names, for the heading of one that did not start."""
    executor = cfg.environments.get(name, {}).get("executor")
    if isinstance(executor, str):
        return executor
    return type(executor).__name__ if executor is not None else "local"


def _doctor_rows(hub: Any, name: str, timeout: float) -> list[tuple[str, bool | None, str]]:
    from wove_adapters.core import loop as shared_loop

    rows: list[tuple[str, bool | None, str]] = []
    problems = _executor_config_problems(hub.config, name)
    if problems:  # reported before the executor (and its backend library) is touched
        return [("executor_config", False, problem) for problem in problems]
    try:
        dispatcher = hub.dispatcher(name)
    except Exception as exc:
        return [("executor starts", False, f"{type(exc).__name__}: {exc}")]
    rows.append(("executor starts", True, dispatcher.transport.name))
    # An adapter's checks of its backend, then its return path's (AdapterTransport.doctor).
    checks = getattr(dispatcher.transport, "doctor", None)
    if checks is not None:
        try:
            rows.extend(shared_loop.run_sync(checks(), timeout))
        except Exception as exc:
            rows.append(("backend checks", False, f"did not finish within {timeout:g}s: "
                         f"{type(exc).__name__}: {exc}"))
    if any(ok is False for _, ok, _ in rows):
        rows.append(("probe task round trip", None,
                     "not sent until the failures above are fixed (it would wait in the "
                     "queue for a worker)"))
        return rows
    start = time.perf_counter()
    future = hub.submit(
        _probe, 1, environment=name,
        task_options={
            "task_name": PROBE_TASK,
            # On a timeout the runtime cancels the probe, so none is left on the broker.
            "delivery_timeout": timeout,
            "delivery_cancel_mode": "best_effort",
            "delivery_orphan_policy": "cancel",
        },
    )
    try:
        value = future.result(timeout=timeout + 10)
        rows.append(("probe task round trip", value == 2,
                     f"{(time.perf_counter() - start) * 1000:.1f} ms"))
    except Exception as exc:
        rows.append(("probe task round trip", False,
                     f"{type(exc).__name__}: {str(exc).rstrip('.')}. The checks above "
                     f"passed, so look at the worker's log: it may be stuck, or dead but "
                     f"still registered"))
    return rows


# ---------------------------------------------------------------- serve


@main.command("serve")
@click.option("--transport", type=click.Choice(["http", "https", "grpc", "websocket"]),
              required=True, help="What wove's network executor speaks to this service.")
@click.option("--listen", default="127.0.0.1:8765", show_default=True,
              help="HOST:PORT. A non-loopback host needs TLS and authentication.")
@click.option("--security", default=None,
              help="env:VAR: signed requests, the shared secret in $VAR (wove's "
              "security='env:VAR'); 'none': no authentication (loopback only).")
@click.option("--security-key", default="default", show_default=True,
              help="The signing key id clients send (wove's security.key).")
@click.option("--clock-skew", default=300.0, show_default=True,
              help="Seconds a signed request's timestamp may differ from this clock.")
@click.option("--bearer-token-env", default=None, metavar="VAR",
              help="Bearer mode instead: the token is in $VAR.")
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None)
@click.option("--tls-client-ca", type=click.Path(dir_okay=False), default=None,
              help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--max-tasks", type=int, default=None,
              help="Tasks running at once (default: CPU count).")
@click.option("--max-queued", type=int, default=1000, show_default=True,
              help="Runs waiting for a slot; beyond it: 503 / RESOURCE_EXHAUSTED.")
@click.option("--heartbeat", type=float, default=5.0, show_default=True,
              help="Seconds between heartbeats on streaming transports.")
@click.option("--kill-after", type=float, default=10.0, show_default=True,
              help="Seconds from a cancel's SIGTERM to SIGKILL.")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM: seconds in-flight runs get before they are cancelled.")
@click.option("--on-sigterm", type=click.Choice(["finish", "cancel"]), default="finish",
              show_default=True, help="What SIGTERM does to the runs in flight.")
@click.option("--remember", type=float, default=300.0, show_default=True,
              help="Seconds an idempotency key's outcome is kept for repeats.")
@click.option("--max-body", type=int, default=64 * 1024 * 1024, show_default=True,
              help="Largest request (bytes).")
@click.option("--health-listen", default=None, metavar="HOST:PORT",
              help="Also serve GET /healthz there (the gRPC transport has no HTTP port).")
def serve_cmd(**options: Any) -> None:
    """Run the Wove-compatible network worker service (wove's http, https, grpc and
    websocket executors, and ours) until SIGTERM, then drain. See docs/serve.md."""
    from wove_adapters.worker import serve

    try:
        config = serve.config_from_options(**options)
    except serve.ServeConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(serve.main(config))


@main.command("ui")
@click.option("--listen", default="127.0.0.1:8766", show_default=True,
              help="HOST:PORT. A non-loopback host needs a token.")
@click.option("--ledger", default=None, help="Ledger URL (default: the configured one).")
@click.option("--token", default=None, envvar="WOVE_ADAPTERS_UI_TOKEN",
              help="Required on every request (default: $WOVE_ADAPTERS_UI_TOKEN); needed "
              "to listen beyond loopback. Open /?token=TOKEN once, or send "
              "Authorization: Bearer TOKEN.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="wove_config.py or .toml: the ledger and the secrets outcomes are "
              "verified with (default: discovered upwards from cwd).")
@click.option("--poll", "poll_seconds", type=click.FloatRange(min=0.05), default=1.0,
              show_default=True, help="Seconds between the ledger reads behind live updates.")
def ui_cmd(listen: str, ledger: str | None, token: str | None, config_file: str | None,
           poll_seconds: float) -> None:
    """Serve the live runs page over the ledger, with /api/runs and /metrics, until
    Ctrl-C. See docs/observability.md, "UI"."""
    import os

    from wove_adapters import ui

    os.environ.pop(ui.TOKEN_ENV, None)  # task code run by this process never sees it
    from wove_adapters.core.config import load_config

    config = None
    try:  # the ledger, and each environment's secret for verifying outcomes
        config = load_config(config_file=config_file)
    except (NameError, ValueError, TypeError, FileNotFoundError) as exc:
        if config_file is not None or ledger is None:
            raise _fail(exc) from exc
        click.echo(f"note: the configuration was not loaded ({exc}); outcomes are verified "
                   f"with WOVE_ADAPTERS_SECRET or this user's generated keys", err=True)
    try:
        asyncio.run(_serve_ui(ledger=ledger, listen=listen, token=token, config=config,
                              poll_seconds=poll_seconds))
    except ui.UIConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        pass


async def _serve_ui(**options: Any) -> None:
    import signal

    from wove_adapters import ui

    server = await ui.start(**options)
    click.echo(f"wove-adapters ui: {server.url} (ledger {server.ledger_url})")
    if options.get("token"):
        click.echo("  token required: open the page once as URL?token=TOKEN")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.aclose()


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


def _config_or_none() -> Any:
    from wove_adapters.core.config import load_config

    try:
        return load_config()
    except Exception:
        return None


def _configured_ledger() -> str | None:
    from wove_adapters.core.config import load_config

    try:
        return load_config().ledger
    except Exception:
        return None


if __name__ == "__main__":
    main()
