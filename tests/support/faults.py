"""The fault suite's harness (tests/faults): private brokers, caller programs, execution
counts and the ``Counts`` every scenario asserts.

Everything here starts its own processes, binds them to 127.0.0.1 and stops them by
PID (never by name): a private ``redis-server`` on a free port that a test can SIGKILL and
restart (with or without AOF), caller programs run as subprocesses that can be paused
(SIGSTOP), resumed and killed, real ``rq worker`` processes whose work-horses are found
and killed explicitly (they leave the worker's process group).

Executions are counted on the worker's side: the task (``tests/faults/fault_tasks.py``,
importable by workers through ``PYTHONPATH``) writes start/end lines to per-process marker
files. Outcomes are counted on the caller's side: futures in the test process, or JSON
lines a caller program writes to its results file. ``Counts`` brings both together and
``check`` prints the table and asserts lost 0, duplicated 0, wrong 0, hung 0, no run
executed more often than allowed, cap never exceeded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from dask_cli import DaskCliCluster
from services import ServiceProcess, children, free_port, wait_until

# the fault tests reach them through this module
__all__ = ["children", "free_port", "wait_until"]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
FAULTS_DIR = ROOT / "tests" / "faults"
SUPPORT_DIR = ROOT / "tests" / "support"

# Every Counts checked in this process, for the session's closing table.
RESULTS: list[Counts] = []


# ---------------------------------------------------------------- waiting


def fault_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``tests/faults`` on ``PYTHONPATH``: workers and
    caller programs import ``fault_tasks`` by reference from there."""
    paths = [str(FAULTS_DIR), str(SUPPORT_DIR)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1",
            **(extra or {})}


def task_env() -> dict[str, str]:
    """``executor_config.env`` for executors that start workers from the caller (stdio,
    process): ``fault_tasks`` on their ``PYTHONPATH``."""
    return {"PYTHONPATH": fault_env()["PYTHONPATH"]}


# ---------------------------------------------------------------- processes


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything under it (children first looked up, then killed)."""
    for victim in [pid, *descendants(pid)]:
        kill(victim)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        kill(proc.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
        kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc.pid)
            proc.wait(timeout)


@contextlib.contextmanager
def each_stopped() -> Iterator[Callable[[T], T]]:
    """``keep(thing)`` returns ``thing``; when the block ends (a fixture's teardown),
    every kept thing's ``stop()`` runs, in the order they were kept. Keep a process
    before starting it, so one that fails to start is stopped too."""
    kept: list[Any] = []

    def keep(thing: T) -> T:
        kept.append(thing)
        return thing

    try:
        yield keep
    finally:
        for thing in kept:
            thing.stop()


# ---------------------------------------------------------------- a private redis-server


class RedisServer:
    """A ``redis-server`` of this test's own on a free 127.0.0.1 port, killed (SIGKILL)
    and restarted by PID. ``aof=True`` persists every write (``appendfsync always``) so a
    restart reloads what the killed server had acknowledged; without it a restart comes
    back empty, as a broker without persistence does."""

    def __init__(self, directory: Path, *, aof: bool = False, port: int | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.port = port or free_port()
        self.service: ServiceProcess | None = None
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.service is None else self.service.proc

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> RedisServer:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--dir", str(self.directory), "--daemonize", "no",
                   "--logfile", str(self.directory / "redis.log"),
                   "--appendonly", "yes" if self.aof else "no"]
        if self.aof:
            command += ["--appendfsync", "always"]
        self.starts += 1
        # redis-server writes its own log (--logfile); the service log keeps what it
        # prints before it opens that file.
        self.service = ServiceProcess(
            f"the private redis-server on 127.0.0.1:{self.port} (is redis-server installed? "
            "apt-get install redis-server)", command, log=self.directory / "redis.out",
            ready=self.ping, ready_timeout=timeout, grace=10, kill_group_after=False,
        )
        try:
            self.service.start()
        except RuntimeError as exc:
            log = self.directory / "redis.log"
            raise AssertionError(f"{exc}\n{log.read_text()[-1500:] if log.exists() else ''}"
                                 ) from None
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset, as a crashed broker."""
        if self.service is not None and self.service.running():
            self.service.kill()

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()


# ---------------------------------------------------------------- an rq worker


class RqWorkerProcess:
    """One ``rq worker`` (our Worker class) on ``queue`` at ``redis_url``, in its own
    session, stopped by PID. RQ forks a work-horse per job that leaves the worker's
    process group: ``horses()`` finds them by parent PID so a test kills them explicitly."""

    def __init__(self, redis_url: str, queue: str, log_dir: Path, *,
                 worker_class: str = "wove_adapters.adapters.rq.Worker") -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.name = f"{queue}-{uuid.uuid4().hex[:6]}"
        self.log_path = log_dir / f"{self.name}.log"
        command = [sys.executable, "-m", "rq.cli", "worker", queue, "--url", redis_url,
                   "--name", self.name, "--logging_level", "WARNING",
                   "--worker-class", worker_class]
        self.service = ServiceProcess(f"rq worker {self.name}", command, log=self.log_path,
                                      env=fault_env(), cwd=log_dir).launch()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.popen

    @property
    def pid(self) -> int:
        return self.service.pid

    def wait_ready(self, timeout: float = 60.0) -> RqWorkerProcess:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            self.service.wait_ready(
                timeout, ready=lambda: client.exists(f"rq:worker:{self.name}".encode()))
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None
        finally:
            client.close()
        return self

    def horses(self) -> list[int]:
        return children(self.pid)

    def kill(self) -> None:
        """SIGKILL the worker and its work-horses (the whole worker dies, as on a lost host)."""
        horses = self.horses()
        self.service.kill()
        for pid in horses:
            kill(pid)

    def stop(self) -> None:
        horses = self.horses()
        if self.service.running():
            # Two SIGTERMs: RQ's cold shutdown kills the running work-horse, then exits.
            kill(self.pid, signal.SIGTERM)
            time.sleep(0.1)
            self.service.stop()
        for pid in horses:
            kill(pid)


class _QueueWorker:
    """A queue system's worker CLI on ``queue`` at ``redis_url``, in its own session,
    stopped by PID; ready once ``announced`` says so; ``kill`` SIGKILLs the whole session
    (a lost host: its running jobs and payload processes die with it)."""

    kind = ""

    def __init__(self, redis_url: str, queue: str, log_dir: Path, command: list[str],
                 env: Mapping[str, str]) -> None:
        self.redis_url = redis_url
        self.queue = queue
        log = log_dir / f"{self.kind}-{queue}-{uuid.uuid4().hex[:6]}.log"
        self.service = ServiceProcess(f"{self.kind} worker on {queue}", command, log=log,
                                      env=fault_env(env), cwd=log_dir, grace=10).launch()

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.service.popen

    def announced(self, client: Any) -> bool:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 90.0) -> Any:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            self.service.wait_ready(timeout, ready=lambda: self.announced(client))
        except RuntimeError as exc:
            raise AssertionError(str(exc)) from None
        finally:
            client.close()
        return self

    def kill(self) -> None:
        self.service.kill()

    def stop(self) -> None:
        self.service.stop()


class ArqWorkerProcess(_QueueWorker):
    """``python -m arq fault_arq_settings.WorkerSettings``: payloads run in its threads
    (``isolation="thread"``)."""

    kind = "arq"

    def __init__(self, redis_url: str, queue: str, log_dir: Path) -> None:
        super().__init__(redis_url, queue, log_dir,
                         [sys.executable, "-m", "arq", "fault_arq_settings.WorkerSettings"],
                         {"WOVE_FAULTS_ARQ_REDIS_URL": redis_url, "WOVE_FAULTS_ARQ_QUEUE": queue})

    def announced(self, client: Any) -> bool:
        """arq writes its health check every second."""
        return bool(client.exists(f"{self.queue}:health-check"))


class TaskiqWorkerProcess(_QueueWorker):
    """``taskiq worker fault_taskiq_app:broker``: one worker process, four payload
    processes from the warm pool."""

    kind = "taskiq"

    def __init__(self, redis_url: str, queue: str, log_dir: Path) -> None:
        super().__init__(
            redis_url, queue, log_dir,
            [sys.executable, "-m", "taskiq", "worker", "fault_taskiq_app:broker",
             "--workers", "1", "--max-async-tasks", "4", "--log-level", "WARNING",
             "--shutdown-timeout", "5", "--wait-tasks-timeout", "5"],
            {"WOVE_FAULTS_TASKIQ_URL": redis_url, "WOVE_FAULTS_TASKIQ_QUEUE": queue})

    def announced(self, client: Any) -> bool:
        """One of its worker processes announced itself (its payload processes are warm
        by then)."""
        from wove_adapters.worker.taskiq import workers_key

        seen = client.zrangebyscore(workers_key(self.queue), time.time() - 15, "+inf")
        pids = {str(pid) for pid in children(self.service.pid)}
        names = [m.decode() if isinstance(m, bytes) else str(m) for m in seen]
        return any(name.rsplit(":", 1)[-1] in pids for name in names)


class DaskCluster(DaskCliCluster):
    """``dask scheduler`` + ``dask worker`` from Dask's own CLI (``tests/support/dask_cli``),
    with this suite's environment. ``kill_workers`` SIGKILLs the whole ``dask worker``
    session (CLI, nannies, worker processes)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory, env=fault_env())

    def start(self, workers: int = 2) -> DaskCluster:
        self.start_scheduler()
        return self.start_workers(workers)

    def start_workers(self, count: int = 2) -> DaskCluster:
        self.launch_workers(count)
        self.wait_workers(count)
        return self

    def wait_workers(self, count: int, timeout: float = 90) -> None:
        """Exactly ``count`` workers (killed ones gone from the scheduler's view)."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == count,
                       timeout, f"{count} dask workers at {self.address}", interval=0.2)

    def stop(self, *, grace: float = 10.0) -> None:
        super().stop(grace=grace)


# ---------------------------------------------------------------- caller programs

CALLER_HEADER = """\
import asyncio, json, os, sys, time
from wove_adapters import Hub
import fault_tasks

PARAMS = json.loads({params!r})
_OUT = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

def emit(**fields):
    '''One JSON line per fact (submitted run id, result, error), written at once: a test
    that SIGKILLs this process reads everything emitted before the kill.'''
    os.write(_OUT, (json.dumps(fields, default=repr) + "\\n").encode())

"""


# A caller program's usual body: one Hub, ``PARAMS["tags"]`` submitted (each emits
# ``submitted`` with its run id), then each result waited for and emitted (``result`` with
# ``value`` or ``error``; ``hung`` when it did not come within ``PARAMS["bound"]``). With
# ``PARAMS["hold"]`` it emits ``holding`` and sleeps instead: the test kills it.
SUBMIT_AND_WAIT = """
import concurrent.futures
with Hub(environments={"faults": PARAMS["environment"]}, default_environment="faults",
         ledger=PARAMS.get("ledger")) as hub:
    futures = {}
    for tag in PARAMS["tags"]:
        future = hub.submit(fault_tasks.work, PARAMS["markers"], tag, PARAMS["seconds"])
        futures[tag] = future
        emit(kind="submitted", tag=tag, run_id=future.run_id)
    if PARAMS.get("hold"):
        emit(kind="holding")
        time.sleep(3600)
    deadline = time.monotonic() + PARAMS["bound"]
    for tag, future in futures.items():
        try:
            value = future.result(timeout=max(0.0, deadline - time.monotonic()))
            emit(kind="result", tag=tag, run_id=future.run_id, value=value)
        except concurrent.futures.TimeoutError:
            emit(kind="result", tag=tag, run_id=future.run_id, hung=True)
        except BaseException as exc:
            emit(kind="result", tag=tag, run_id=future.run_id,
                 error=f"{type(exc).__name__}: {exc}")
"""

class Caller:
    """A caller program (a Hub in its own interpreter) the test can pause, resume and
    kill. ``body`` runs after ``CALLER_HEADER``: it sees ``PARAMS`` (JSON), ``emit(...)``
    (a JSON line to the results file), ``Hub`` and ``fault_tasks``."""

    def __init__(self, workdir: Path, body: str, params: Mapping[str, Any] | None = None, *,
                 name: str | None = None, env: Mapping[str, str] | None = None) -> None:
        self.name = name or f"caller-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.script = workdir / f"{self.name}.py"
        self.out = workdir / f"{self.name}.jsonl"
        self.stdout = workdir / f"{self.name}.stdout"
        self.stderr = workdir / f"{self.name}.stderr"
        self.script.write_text(CALLER_HEADER.format(params=json.dumps(dict(params or {})),
                                                    out=str(self.out))
                               + textwrap.dedent(body))
        self.env = fault_env(env)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Caller:
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(self.script)], cwd=self.workdir,
                                         env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None, "start() the caller first"
        return self.proc.pid

    def pause(self) -> None:
        kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the caller only: its detached workers (own sessions) live on."""
        kill(self.pid)
        assert self.proc is not None
        self.proc.wait(10)

    def wait(self, timeout: float) -> int:
        """The exit code; fail with the caller's stderr if it runs past ``timeout``."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.resume()
            kill(self.pid)
            self.proc.wait(10)
            raise AssertionError(f"caller {self.name} still running after {timeout:.0f}s "
                                 f"(killed); stderr: {self.errors()[-3000:]}") from None

    def errors(self) -> str:
        return self.stderr.read_text() if self.stderr.exists() else ""

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Complete JSON lines emitted so far (a line cut by SIGKILL is ignored)."""
        if not self.out.exists():
            return []
        found = []
        for line in self.out.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if kind is None or record.get("kind") == kind:
                    found.append(record)
        return found

    def wait_records(self, kind: str, count: int, timeout: float) -> list[dict[str, Any]]:
        def enough() -> list[dict[str, Any]] | None:
            records = self.records(kind)
            if len(records) >= count:
                return records
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"caller {self.name} exited with {self.proc.returncode} after "
                    f"{len(records)} of {count} '{kind}' records: {self.errors()[-3000:]}")
            return None

        return wait_until(enough, timeout, f"{count} '{kind}' records from {self.name}")

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


# ---------------------------------------------------------------- executions (worker side)


@dataclass(frozen=True)
class Mark:
    event: str  # start | end
    tag: str
    at: float   # time.monotonic() in the worker
    pid: int


def read_marks(markers: Path) -> list[Mark]:
    marks = []
    for path in markers.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4:
                marks.append(Mark(parts[0], parts[1], float(parts[2]), int(parts[3])))
    marks.sort(key=lambda m: m.at)
    return marks


def executions(markers: Path) -> Counter[str]:
    """Executions per tag: how many times the task started for it."""
    return Counter(m.tag for m in read_marks(markers) if m.event == "start")


def running(markers: Path) -> dict[str, int]:
    """Tags executing now (started, not ended) -> the pid executing them."""
    open_: dict[tuple[str, int], int] = Counter()
    for mark in read_marks(markers):
        open_[(mark.tag, mark.pid)] += 1 if mark.event == "start" else -1
    return {tag: pid for (tag, pid), n in open_.items() if n > 0 and alive(pid)}


def unfinished(markers: Path) -> Counter[str]:
    """Executions per tag that started and never ended: their process was killed."""
    left: Counter[str] = Counter()
    for mark in read_marks(markers):
        left[mark.tag] += 1 if mark.event == "start" else -1
    return +left


def allowed_after_kills(markers: Path) -> dict[str, int]:
    """Executions each tag may have under ``requeue``: one, plus one per execution that a
    kill cut short (the documented at-least-once). Anything above is a duplicate."""
    return {tag: 1 + n for tag, n in unfinished(markers).items()}


def processes_running(pattern: str, under: int | None = None) -> list[int]:
    """PIDs whose command line contains ``pattern`` (only below ``under`` when given)."""
    pids = descendants(under) if under is not None else [
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if pattern in cmdline and alive(pid):
                found.append(pid)
    return found


def wait_quiet(markers: Path, quiet: float = 3.0, timeout: float = 90.0) -> Counter[str]:
    """Wait until no execution runs and none has started for ``quiet`` seconds (workers
    of a killed caller may still be starting): the executions per tag then."""
    state: dict[str, Any] = {"seen": None, "since": time.monotonic()}

    def settled() -> tuple[Counter[str]] | None:
        seen = executions(markers)
        if seen != state["seen"] or running(markers):
            state["seen"], state["since"] = seen, time.monotonic()
            return None
        # A tuple: no execution at all (a caller killed before any started) is an
        # answer too, though an empty Counter is falsy.
        return (seen,) if time.monotonic() - state["since"] >= quiet else None

    return wait_until(settled, timeout, f"the workers to be quiet for {quiet:.0f}s",
                      interval=0.1)[0]


def max_concurrent(markers: Path) -> int:
    """The most executions that ran at once. An execution without an end mark (its
    process was killed) counts until its process's next mark, else to the last mark."""
    marks = read_marks(markers)
    if not marks:
        return 0
    last = marks[-1].at
    by_pid: dict[int, list[Mark]] = defaultdict(list)
    for mark in marks:
        by_pid[mark.pid].append(mark)
    spans: list[tuple[float, int]] = []
    for pid_marks in by_pid.values():
        start: float | None = None
        for mark in pid_marks:
            if mark.event == "start":
                if start is not None:
                    spans += [(start, 1), (mark.at, -1)]
                start = mark.at
            elif start is not None:
                spans += [(start, 1), (mark.at, -1)]
                start = None
        if start is not None:
            spans += [(start, 1), (last, -1)]
    # Ends sort before starts at the same instant: back to back is not at once.
    spans.sort(key=lambda s: (s[0], s[1]))
    now = most = 0
    for _, step in spans:
        now += step
        most = max(most, now)
    return most


# ---------------------------------------------------------------- outcomes and counts


@dataclass
class Counts:
    """What a scenario gave. ``runs``: run ids handed out; ``ok``: runs with exactly one
    correct result; ``lost``: runs that ended without a result (an orphan error, not in
    the ledger, no outcome recorded); ``duplicated``: runs (or keys) that gave more than
    one result, or a key answered by two executions; ``wrong``: a result that is not this
    run's; ``hung``: no answer within the scenario's bound; ``over_executed``: runs that
    executed more often than allowed (``allowed`` per run, 1 unless a worker running it
    was killed under ``requeue``)."""

    scenario: str
    runs: int = 0
    ok: int = 0
    lost: int = 0
    duplicated: int = 0
    wrong: int = 0
    hung: int = 0
    over_executed: int = 0
    executions: int = 0
    cap: int | None = None
    max_concurrent: int | None = None
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def problem(self, kind: str, text: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 8:
            self.examples.append(f"{kind}: {text}")

    def as_row(self) -> str:
        cap = "" if self.cap is None else f"{self.max_concurrent}/{self.cap}"
        return (f"| {self.scenario} | {self.runs} | {self.ok} | {self.lost} | "
                f"{self.duplicated} | {self.wrong} | {self.hung} | {self.over_executed} | "
                f"{self.executions} | {cap} | {self.seconds:.1f} |")

    @property
    def clean(self) -> bool:
        capped = self.cap is None or (self.max_concurrent or 0) <= self.cap
        return (capped and self.ok == self.runs and not (self.lost or self.duplicated
                or self.wrong or self.hung or self.over_executed))


TABLE_HEAD = ("| scenario | runs | ok | lost | duplicated | wrong | hung | over-executed | "
              "executions | max at once/cap | s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def table(counts: Iterable[Counts]) -> str:
    return "\n".join([TABLE_HEAD, *(c.as_row() for c in counts)])


def outcome_of(future: concurrent.futures.Future[Any], timeout: float) -> tuple[str, Any]:
    """("ok", value) | ("error", exception) | ("hung", None), waiting at most ``timeout``."""
    try:
        return "ok", future.result(timeout=max(timeout, 0.0))
    except concurrent.futures.TimeoutError:
        return "hung", None
    except BaseException as exc:
        return "error", exc


def count_futures(counts: Counts, futures: Mapping[str, concurrent.futures.Future[Any]],
                  expected: Mapping[str, Any], *, timeout: float) -> Counts:
    """Tally futures (tag -> future) against ``expected`` (tag -> value); all of them
    share one deadline of ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    counts.runs += len(futures)
    for tag, future in futures.items():
        kind, value = outcome_of(future, deadline - time.monotonic())
        tally(counts, tag, kind, value, expected[tag])
    return counts


def tally(counts: Counts, tag: str, kind: str, value: Any, want: Any) -> None:
    if kind == "hung":
        counts.problem("hung", f"{tag} has no outcome")
    elif kind == "error":
        counts.problem("lost", f"{tag}: {type(value).__name__}: {str(value)[:200]}")
    elif value != want:
        counts.problem("wrong", f"{tag}: got {value!r}, expected {want!r}")
    else:
        counts.ok += 1


def count_records(counts: Counts, records: Iterable[Mapping[str, Any]],
                  expected: Mapping[str, Any], *, key: str = "tag") -> Counts:
    """Tally result records a caller program emitted (``{key: tag, "value": ...}`` or
    ``{key: tag, "error": ...}``). Several records for one tag are duplicated results;
    an expected tag with none is hung."""
    by_tag: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_tag[str(record[key])].append(record)
    counts.runs += len(expected)
    for tag, want in expected.items():
        got = by_tag.get(tag, [])
        if not got:
            counts.problem("hung", f"{tag}: no result record")
            continue
        if len(got) > 1:
            counts.problem("duplicated", f"{tag}: {len(got)} result records")
            continue
        record = got[0]
        if record.get("hung"):
            tally(counts, tag, "hung", None, want)
        elif "error" in record:
            tally(counts, tag, "error", RuntimeError(record["error"]), want)
        else:
            tally(counts, tag, "ok", record.get("value"), want)
    return counts


def count_executions(counts: Counts, markers: Path, tags: Iterable[str], *,
                     allowed: Mapping[str, int] | None = None, default: int = 1) -> Counts:
    """Add worker-side executions: every tag at least once when it has a result (a result
    nobody executed is wrong), at most ``allowed[tag]`` (else ``default``) times."""
    seen = executions(markers)
    counts.executions += sum(seen[tag] for tag in tags)
    for tag in tags:
        limit = (allowed or {}).get(tag, default)
        if seen[tag] > limit:
            counts.problem("over_executed", f"{tag} executed {seen[tag]} times (allowed {limit})")
    return counts


def check(counts: Counts, started: float | None = None) -> None:
    """Print the scenario's row, keep it for the session table, assert it is clean."""
    if started is not None:
        counts.seconds = time.monotonic() - started
    RESULTS.append(counts)
    path = os.environ.get("WOVE_TEST_FAULTS_RESULTS")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps(asdict(counts)) + "\n")
    print("\n" + table([counts]))
    for example in counts.examples:
        print("  " + example)
    cap = "" if counts.cap is None else f", max at once {counts.max_concurrent} (cap {counts.cap})"
    assert counts.clean, (
        f"{counts.scenario}: {counts.ok}/{counts.runs} ok, lost {counts.lost}, duplicated "
        f"{counts.duplicated}, wrong {counts.wrong}, hung {counts.hung}, over-executed "
        f"{counts.over_executed}{cap}\n" + table([counts]) + "\n" + "\n".join(counts.examples))


# ---------------------------------------------------------------- scenarios shared by files


def broker_kill_and_restart(backend: str, executor_config: Callable[[str, str], dict[str, Any]],
                            worker: Callable[[str, str], Any], hub_for: Callable[..., Any],
                            markers: Path, broker: RedisServer, *, runs: int = 24,
                            task_seconds: float = 0.3, heartbeat: float = 2.0,
                            outage: float = 3.0, result_bound: float = 90.0) -> None:
    """The broker-kill scenario (docs/faults.md): ``runs`` runs on two workers of
    ``backend`` over ``broker``; once 4 executed, the broker is SIGKILLed (some runs must
    still be queued), stays down ``outage`` seconds and restarts; each worker that exited
    meanwhile is replaced, as a supervisor would, and the ones that lived on keep
    working. Under ``requeue`` + heartbeats every run gives exactly one correct result."""
    import fault_tasks

    started = time.monotonic()
    queue = f"faults-{backend}-{uuid.uuid4().hex[:8]}"
    workers = [worker(broker.url(), queue), worker(broker.url(), queue)]
    hub = hub_for({"executor": backend,
                   "executor_config": executor_config(broker.url(), queue),
                   "delivery_orphan_policy": "requeue",
                   "delivery_heartbeat_seconds": heartbeat})
    prefix = uuid.uuid4().hex[:6]
    tags = [f"{prefix}-{i}" for i in range(runs)]
    futures = {tag: hub.submit(fault_tasks.work, str(markers), tag, task_seconds)
               for tag in tags}
    # Mid-burst: some done, some running, most still queued, and every run handed over
    # (a submit made while the broker is down fails with BackendUnavailableError: a
    # different scenario; this one is about the runs the broker held).
    dispatcher = hub.dispatcher("faults")

    def handed_over() -> bool:
        held = dispatcher.runs
        return all(future.done() or ((run := held.get(future.run_id)) is not None
                                     and run.launched) for future in futures.values())

    wait_until(lambda: handed_over() and sum(executions(markers).values()) >= 4, 60,
               "every run handed over and 4 executed before the outage")
    broker.kill()
    # Not vacuous: the outage caught runs no worker had started (the queue's own loss).
    waiting = runs - len(executions(markers))
    assert waiting > 0, "every run had started before the broker died: nothing was tested"
    time.sleep(outage)
    broker.start()
    exited = [old for old in workers if old.proc.poll() is not None]
    workers += [worker(broker.url(), queue) for _ in exited]
    counts = Counts(f"broker kill {outage:.0f}s + restart: {backend} "
                    f"({'AOF' if broker.aof else 'no persistence'})")
    count_futures(counts, futures, {tag: fault_tasks.expected(tag) for tag in tags},
                  timeout=result_bound)
    count_executions(counts, markers, tags, allowed=allowed_after_kills(markers))
    check(counts, started)
