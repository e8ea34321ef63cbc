"""One way to run a service process for the tests and the benchmarks.

Every backend needs real processes next to the test (a broker's worker, a scheduler, an
emulator, a dev server). They all need the same four things, and getting any of them
wrong leaks processes onto a machine shared with other test runs:

- its own process group (``start_new_session``), so stopping it reaches what it forked
  and nothing else on the machine;
- a log file, whose tail goes into every error, so a service that did not come up says why;
- readiness as a question asked until a deadline (a ping, a registration, a port file),
  never a sleep and a hope; a process that exits while starting fails at once;
- stop by PID: SIGTERM (the service's own clean shutdown), then SIGKILL of the whole
  group after a bound.

``ServiceProcess(...).start()`` / ``.stop()``, or ``with ServiceProcess(...) as service:``.
Benchmarks import this module the way they import the backends' service files: with
``tests/support`` on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service process did not come up; the message carries its log's tail."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on ``host:port`` (a readiness check)."""
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def require_redis(url: str, *, url_env: str, suite: str) -> None:
    """Fail the calling test, saying how to start Redis, when ``url`` does not answer
    (the shared Redis every queue backend's tests use under a prefix of their own)."""
    import pytest
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"Redis is not reachable at {url} ({exc}). Start it with "
            f"`redis-server --daemonize yes --bind 127.0.0.1 --port 6379` (or point "
            f"{url_env} at one) and run the {suite} tests again.",
            pytrace=False,
        )
    finally:
        client.close()


def scratch_queue(
    prefix: str, require: Callable[[], None], cleanup: Callable[[str], None]
) -> Iterator[str]:
    """A fixture's own queue name (``prefix-<hex>``) on a shared broker: ``require`` fails
    the test when the broker is not there, ``cleanup(name)`` removes what the test left
    under that name afterwards (never a flush: others use the broker too)."""
    require()
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    yield name
    cleanup(name)


def log_tail(path: Path | None, chars: int = 3000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    return path.read_text(errors="replace")[-chars:]


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (work-horses and forks that left its process group)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test
    naming ``what`` after ``timeout`` seconds. Every wait in the tests is bounded."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie has stopped: only its exit status is
    left for its parent to read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone (FileNotFoundError), or exiting during the read (ESRCH)
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def poll_until(
    ready: Callable[[], T],
    timeout: float,
    what: str,
    *,
    alive: Callable[[], str | None] = lambda: None,
    interval: float = 0.05,
) -> T:
    """Ask ``ready`` until it answers truthy (its answer is returned) or ``timeout``
    passes. An exception from ``ready`` counts as "not yet". ``alive`` returns a reason
    when waiting longer is pointless (the process exited): that fails at once."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        reason = alive()
        if reason is not None:
            raise ServiceError(f"{what}: {reason}")
        try:
            answer = ready()
        except Exception as exc:  # not ready yet; kept for the message
            last = exc
        else:
            if answer:
                return answer
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise ServiceError(f"{what}: not ready within {timeout:g}s{detail}")
        time.sleep(interval)


class ServiceProcess:
    """A command run in its own process group, logging to ``log``, ready when ``ready()``
    says so, stopped by PID (SIGTERM, then SIGKILL of its group after ``grace``).

    ``term_group``: send the SIGTERM to the whole group instead of the leader (for a CLI
    that does not forward it to the processes it started). ``kill_group_after``: SIGKILL
    the group once the leader is gone, for children that outlived it (default on; off for
    a leader that must be the one to stop its children, e.g. ``ray start``)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        ready: Callable[[], Any] | None = None,
        ready_timeout: float = 60.0,
        grace: float = 15.0,
        term_group: bool = False,
        kill_group_after: bool = True,
        append_log: bool = False,
    ) -> None:
        self.name = name
        self.argv = [str(arg) for arg in argv]
        self.log = log
        self.env = dict(os.environ if env is None else env)
        self.cwd = None if cwd is None else str(cwd)
        self.ready = ready
        self.ready_timeout = ready_timeout
        self.grace = grace
        self.term_group = term_group
        self.kill_group_after = kill_group_after
        self.append_log = append_log
        self.proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------ state

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        """The process (running or exited): for the holders that expose it (``.proc``)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log, chars)

    def exited(self) -> str | None:
        """Why waiting for this process is pointless (it exited), else None."""
        if self.proc is not None and self.proc.poll() is not None:
            return f"exited with {self.proc.returncode}; log {self.log}:\n{self.log_tail()}"
        return None

    # ------------------------------------------------------------ life cycle

    def launch(self) -> ServiceProcess:
        """Start the process without waiting for it (``wait_ready`` later)."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab" if self.append_log else "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        return self

    def start(self) -> ServiceProcess:
        """Launch, then wait until ready; a process that never gets ready is stopped and
        the error carries its log."""
        self.launch()
        if self.ready is not None:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def wait_ready(self, timeout: float | None = None, ready: Callable[[], T] | None = None) -> T:
        """Poll ``ready`` (the one given at construction by default) until it answers."""
        check: Callable[[], Any] | None = ready or self.ready
        if check is None:
            raise RuntimeError(f"{self.name} has no readiness check")
        try:
            answer: T = poll_until(check, self.ready_timeout if timeout is None else timeout,
                                   self.name, alive=self.exited)
        except ServiceError as exc:
            if self.exited() is None:
                raise ServiceError(f"{exc}; log {self.log}:\n{self.log_tail()}") from None
            raise
        return answer

    def signal_group(self, sig: int) -> None:
        """Send ``sig`` to this service's process group (only what it started)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM by PID (or to the group), wait ``grace``, then SIGKILL the group."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            if self.term_group:
                self.signal_group(signal.SIGTERM)
            else:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.grace if grace is None else grace)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        if self.kill_group_after:
            self.signal_group(signal.SIGKILL)

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crashed host would."""
        if self.proc is None:
            return
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def __enter__(self) -> ServiceProcess:
        return self if self.proc is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
