"""CPython's generic concurrent.futures tests against ``hub.executor(...)``.

The executor, wait, as_completed and shutdown test mixins of ``test_concurrent_futures``
(plus its worker-crash tests for the executors that run tasks in other processes) run
unchanged against a Hub executor over ``local``, ``stdio`` and ``process``. What does not
apply is excluded below (``EXCLUDED``), each test by name with its reason; the two ways a
Hub run's error differs from a broken process pool are in ``ADAPTED_ERRORS``; known
defects outside the executors run as expected failures (``PENDING``). CPython's file comes
from Debian's ``libpython3.11-testsuite``; without it the module fails saying so.

The second half checks what the executors themselves owe that contract (``SystemExit`` in
a task, crashed and killed workers, results the caller cannot unpickle, pool sizes).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import pickle
import signal
import sys
import time
import traceback
import unittest
import unittest.mock
from pathlib import Path
from typing import Any, ClassVar

import pytest

from wove_adapters import Hub
from wove_adapters.core.errors import (
    DeliveryOrphanedError,
    TaskExecutionError,
    UnsupportedPolicyError,
)
from wove_adapters.testing import tasks
from wove_adapters.testing.conformance import wait_for_file

_TESTS_DIR = str(Path(__file__).resolve().parents[2])
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support import cpython_futures  # noqa: E402
from support.services import pid_alive  # noqa: E402

cf = cpython_futures.load()

# ------------------------------------------------------------------ exclusions

# Tests that cannot mean anything for a given executor, with the reason.
_LOCAL_NO_PICKLE = (
    "local passes arguments and results by reference, in the caller's process: nothing is "
    "pickled or unpickled, so there is no pickling failure to observe"
)
_LOCAL_CRASH = (
    "local runs the callable in the caller's own process: a segfault there kills the "
    "caller, as with ThreadPoolExecutor, which CPython does not run this test against"
)
_PPE_INTERNALS = (
    "reads ProcessPoolExecutor._executor_manager_thread, an internal with no counterpart "
    "in a Hub executor (its calls run on the shared loop); the behaviour it checks, a "
    "pickling error surfacing in the future, is test_error_at_task_pickle"
)
_HUB_EXIT = (
    "HubExecutor.submit from an atexit hook, after the Hub's exit hook ran, is accepted "
    "silently; it must raise RuntimeError('cannot schedule new futures after interpreter "
    "shutdown') as ThreadPoolExecutor does"
)
EXCLUDED: dict[str, dict[str, str]] = {
    "local": {
        "test_error_at_task_pickle": _LOCAL_NO_PICKLE,
        "test_exit_at_task_unpickle": _LOCAL_NO_PICKLE,
        "test_error_at_task_unpickle": _LOCAL_NO_PICKLE,
        "test_crash_at_task_unpickle": _LOCAL_NO_PICKLE,
        "test_crash_during_func_exec_on_worker": _LOCAL_CRASH,
        "test_crash_during_result_pickle_on_worker": _LOCAL_NO_PICKLE,
        "test_exit_during_result_pickle_on_worker": _LOCAL_NO_PICKLE,
        "test_error_during_result_pickle_on_worker": _LOCAL_NO_PICKLE,
        "test_error_during_result_unpickle_in_result_handler": _LOCAL_NO_PICKLE,
        "test_exit_during_result_unpickle_in_result_handler": _LOCAL_NO_PICKLE,
        "test_shutdown_deadlock": _LOCAL_CRASH,
        "test_shutdown_deadlock_pickle": _LOCAL_NO_PICKLE,
    },
    "stdio": {
        "test_shutdown_deadlock_pickle": _PPE_INTERNALS,
    },
    "process": {
        "test_shutdown_deadlock_pickle": _PPE_INTERNALS,
    },
}
ALL = ("local", "stdio", "process")

# Known failures whose fix lies outside the executors (Hub futures, the payload worker,
# the receiver path), run as expected failures so that a fix shows as an unexpected
# success: then delete the entry.
PENDING: dict[str, dict[str, str]] = {
    "local": {},
    "stdio": {},
    "process": {
    },
}

# Worker-crash tests keep CPython's bodies with two documented differences in what the
# future raises (``ExecutorDeadlockTest``):
# - Where ProcessPoolExecutor raises BrokenProcessPool, a Hub run raises
#   TaskExecutionError: a worker that crashes fails only the run it was running (kind
#   "WorkerCrashed", with pid, exit code and signal), and the pool replaces the worker
#   instead of breaking; a result the caller cannot unpickle fails only its run too.
# - A task whose callable or arguments cannot be unpickled on the worker: the worker
#   unpickles them inside the run's own error handling, so the run raises what the
#   unpickling raised (and the worker lives on), not BrokenProcessPool.
ADAPTED_ERRORS: dict[str, dict[str, type[BaseException]]] = {
    "stdio": {
        "test_exit_at_task_unpickle": SystemExit,
        "test_error_at_task_unpickle": pickle.UnpicklingError,
    },
    "process": {
        "test_exit_at_task_unpickle": SystemExit,
        "test_error_at_task_unpickle": pickle.UnpicklingError,
    },
}


class HubExecutorMixin:
    """CPython's ``ExecutorMixin`` builds ``executor_type(max_workers=worker_count)``; ours
    is a Hub executor. Not CPython's ``BaseTestCase``: its thread-count and
    ``reap_children`` checks are for pools that own their threads and children, while the
    Hub keeps its loop thread and worker pools for the whole process by design, and
    ``reap_children`` would steal the exit status of workers asyncio is waiting for."""

    executor_name: ClassVar[str]
    executor: Any

    def get_context(self) -> None:
        return None

    def tearDown(self) -> None:
        executor = self.executor
        super().tearDown()  # type: ignore[misc]
        if executor is not None:
            executor._hub.close()


class HubDeadlockMixin(HubExecutorMixin):
    """``ExecutorDeadlockTest`` with the error mapping of ``ADAPTED_ERRORS`` above, and a
    10 s bound per outcome instead of 30: a Hub reports a crashed worker within a second."""

    _testMethodName: str
    TIMEOUT = 10.0

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        patcher = unittest.mock.patch.object(cf, "BrokenProcessPool", TaskExecutionError)
        patcher.start()
        self.addCleanup(patcher.stop)  # type: ignore[attr-defined]

    def _check_crash(
        self, error: type[BaseException], func: Any, *args: Any, **kwargs: Any
    ) -> None:
        if error is cf.BrokenProcessPool or error is TaskExecutionError:
            error = TaskExecutionError
        error = ADAPTED_ERRORS.get(self.executor_name, {}).get(self._testMethodName, error)
        super()._check_crash(error, func, *args, **kwargs)  # type: ignore[misc]

    def _fail_on_deadlock(self, executor: Any) -> None:
        """CPython's version kills ``executor._processes``; a Hub executor has none."""
        executor.shutdown(wait=False, cancel_futures=True)
        self.fail(f"no outcome within {self.TIMEOUT}s: the run hangs")  # type: ignore[attr-defined]


def _expected_failure(test: Any) -> Any:
    """``unittest.expectedFailure`` on a copy: it marks the function it is given, and
    CPython's test functions are shared by every executor's class."""

    @functools.wraps(test)
    def copy(self: Any) -> Any:
        return test(self)

    return unittest.expectedFailure(copy)


def _make(executor: str, mixin_name: str) -> type[unittest.TestCase]:
    assert cf is not None
    mixin = getattr(cf, mixin_name)
    factory = getattr(cpython_futures, f"{executor.capitalize()}HubExecutor")
    namespace: dict[str, Any] = {
        "executor_name": executor,
        "executor_type": staticmethod(factory),
        "__module__": __name__,
    }
    for name in dir(mixin):
        if not name.startswith("test_"):
            continue
        if name in EXCLUDED[executor]:
            namespace[name] = unittest.skip(EXCLUDED[executor][name])(getattr(mixin, name))
        elif name in PENDING[executor]:
            namespace[name] = _expected_failure(getattr(mixin, name))
    title = mixin_name.removesuffix("Tests").removesuffix("Test")
    ours = HubDeadlockMixin if mixin_name == "ExecutorDeadlockTest" else HubExecutorMixin
    cls = type(
        f"Test{executor.capitalize()}{title}",
        (ours, mixin, cf.ExecutorMixin, unittest.TestCase),
        namespace,
    )
    return cls


if cf is None:

    def test_cpython_futures_tests_are_installed() -> None:
        raise AssertionError(cpython_futures.MISSING)

else:
    for _executor in ALL:
        for _mixin in ("ExecutorTest", "WaitTests", "AsCompletedTests", "ExecutorShutdownTest"):
            _cls = _make(_executor, _mixin)
            globals()[_cls.__name__] = _cls
        _cls = _make(_executor, "ExecutorDeadlockTest")
        globals()[_cls.__name__] = _cls
    del _cls


# ------------------------------------------------------------------ the transport side
#
# What the executors themselves must do for the contract above to hold, each checked on
# real worker threads and processes.


def _hub(executor: str, workers: int = 2, **settings: Any) -> Hub:
    config: dict[str, Any] = dict(settings.pop("executor_config", {}))
    if executor == "stdio":
        config.setdefault("processes", workers)
    elif executor == "local":
        config.setdefault("max_workers", workers)
    definition = {"executor": executor, "executor_config": config, **settings}
    return Hub(environments={"t": definition}, default_environment="t")


def exits(code: int) -> None:
    raise SystemExit(code)


def interrupts() -> None:
    raise KeyboardInterrupt("from the task")


async def exits_async(code: int) -> None:
    await asyncio.sleep(0)
    raise SystemExit(code)


def naps(seconds: float, value: int) -> int:
    time.sleep(seconds)
    return value


def segfaults() -> None:
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()  # type: ignore[attr-defined]


def pid_then_sleep(directory: str, seconds: float) -> None:
    Path(directory, "pid").write_text(str(os.getpid()))
    time.sleep(seconds)


class ExitsWhenUnpickled:
    """Pickles fine on the worker; unpickling it calls ``sys.exit(3)``."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.exit, (3,))


def returns_exit_bomb() -> ExitsWhenUnpickled:
    return ExitsWhenUnpickled()


def returns_worker_only_type() -> Any:
    import importlib

    return importlib.import_module("only_on_the_worker").Thing()


def test_local_refuses_require_ack_at_start() -> None:
    """A running thread cannot be stopped, so ``local`` cannot confirm a cancel."""
    hub = _hub("local", delivery_cancel_mode="require_ack")
    with pytest.raises(UnsupportedPolicyError, match="require_ack.*'local'"):
        hub.dispatcher("t")
    hub.close()


@pytest.mark.parametrize(
    ("executor_config", "message"),
    [
        ({"max_workers": 0}, "max_workers must be greater than 0"),
        ({"max_workers": -1}, "max_workers must be greater than 0"),
    ],
)
def test_local_pool_size_is_checked_at_start(executor_config: dict[str, Any], message: str) -> None:
    hub = _hub("local", executor_config=executor_config)
    with pytest.raises(ValueError, match=message):
        hub.dispatcher("t")
    hub.close()


@pytest.mark.parametrize("processes", [0, -1])
def test_stdio_pool_size_is_checked_at_start(processes: int) -> None:
    hub = _hub("stdio", executor_config={"processes": processes})
    with pytest.raises(ValueError, match="processes must be greater than 0"):
        hub.dispatcher("t")
    hub.close()


def test_local_system_exit_fails_only_its_run() -> None:
    """SystemExit and KeyboardInterrupt from a task are its outcome; the shared loop and
    every other run in flight carry on."""
    with _hub("local", workers=8) as hub, hub.executor("t") as pool:
        others = [pool.submit(naps, 0.3, i) for i in range(5)]
        exiting = pool.submit(exits, 3)
        interrupted = pool.submit(interrupts)
        exiting_async = pool.submit(exits_async, 4)
        more = [pool.submit(naps, 0.1, i) for i in range(5, 8)]
        assert [f.result(timeout=30) for f in others + more] == list(range(8))
        error = exiting.exception(timeout=30)
        assert isinstance(error, SystemExit) and error.code == 3
        assert "raise SystemExit(code)" in "".join(traceback.format_tb(error.__traceback__))
        assert isinstance(interrupted.exception(timeout=30), KeyboardInterrupt)
        error = exiting_async.exception(timeout=30)
        assert isinstance(error, SystemExit) and error.code == 4
        assert pool.submit(tasks.add, 1).result(timeout=30) == 2  # the loop is alive


@pytest.mark.parametrize("executor", ["stdio", "process"])
def test_system_exit_in_a_worker_is_the_runs_error(executor: str) -> None:
    with _hub(executor, workers=1) as hub, hub.executor("t") as pool:
        error = pool.submit(exits, 3).exception(timeout=60)
        assert isinstance(error, SystemExit), repr(error)
        assert error.code == 3
        # With its context: the task's own frames, from the worker, and only those.
        remote = str(error.__cause__)
        assert "in exits" in remote and "SystemExit: 3" in remote, remote
        assert "stdio_worker.py" not in remote, remote
        assert pool.submit(tasks.add, 1).result(timeout=60) == 2


def test_stdio_result_the_caller_cannot_unpickle(tmp_path: Path) -> None:
    """The run fails with an error naming the type, and the one worker takes the next task."""
    (tmp_path / "only_on_the_worker.py").write_text("class Thing:\n    pass\n")
    settings = {"executor_config": {"env": {"PYTHONPATH": str(tmp_path)}}}
    with _hub("stdio", workers=1, **settings) as hub, hub.executor("t") as pool:
        pids_before = hub.dispatcher("t").transport.pids  # type: ignore[attr-defined]
        error = pool.submit(returns_worker_only_type).exception(timeout=60)
        assert isinstance(error, TaskExecutionError), repr(error)
        assert "could not be unpickled in the caller" in str(error)
        assert "only_on_the_worker.Thing" in str(error)
        error = pool.submit(returns_exit_bomb).exception(timeout=60)
        assert isinstance(error, TaskExecutionError), repr(error)
        assert "SystemExit" in str(error)
        assert [pool.submit(tasks.add, i).result(timeout=30) for i in range(3)] == [1, 2, 3]
        assert hub.dispatcher("t").transport.pids == pids_before  # type: ignore[attr-defined]


@pytest.mark.parametrize("executor", ["stdio", "process"])
def test_a_task_that_crashes_its_worker_fails_with_the_reason(executor: str) -> None:
    """A segfault fails that run with the exit code and signal; the other runs finish and,
    for stdio, the crashed process is replaced."""
    with _hub(executor, workers=2) as hub, hub.executor("t") as pool:
        others = [pool.submit(naps, 0.5, i) for i in range(3)]
        start = time.monotonic()
        error = pool.submit(segfaults).exception(timeout=60)
        assert isinstance(error, TaskExecutionError), repr(error)
        assert error.kind == "WorkerCrashed"
        assert "exited with code -11 (killed by signal 11, SIGSEGV)" in str(error)
        assert "segfaults" in str(error)
        assert time.monotonic() - start < 10  # seen at once, not by reconciliation
        assert [f.result(timeout=60) for f in others] == [0, 1, 2]
        if executor == "stdio":
            pids = hub.dispatcher("t").transport.pids  # type: ignore[attr-defined]
            assert len(pids) == 2 and all(pid_alive(pid) for pid in pids)


@pytest.mark.parametrize("executor", ["stdio", "process"])
def test_a_worker_killed_from_outside_keeps_the_reason(executor: str, tmp_path: Path) -> None:
    """SIGKILL is not the task's doing: the run is lost and its orphan policy applies,
    with the exit code and signal in the reason (``fail`` here; the default ``cancel``
    resolves the future as cancelled with that reason)."""
    for policy in ("fail", "cancel"):
        directory = tmp_path / policy
        directory.mkdir()
        with _hub(executor, workers=1, delivery_orphan_policy=policy) as hub:
            future = hub.executor("t").submit(pid_then_sleep, str(directory), 60.0)
            start = time.monotonic()
            os.kill(int(wait_for_file(directory / "pid")), signal.SIGKILL)
            error = future.exception(timeout=30)
            expected = (
                DeliveryOrphanedError if policy == "fail" else concurrent.futures.CancelledError
            )
            assert isinstance(error, expected), repr(error)
            assert "exited with code -9 (killed by signal 9, SIGKILL)" in str(error)
            assert time.monotonic() - start < 10
            assert hub.run(tasks.add, 1) == 2


def _error_of(future: concurrent.futures.Future[Any]) -> BaseException | None:
    """The future's exception; a cancellation as the CancelledError it raises."""
    try:
        return future.exception(timeout=30)
    except concurrent.futures.CancelledError as exc:
        return exc
