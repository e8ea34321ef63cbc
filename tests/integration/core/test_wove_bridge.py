"""Our executors inside a real wove 2.x weave (the `wove` package from PyPI)."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

wove = pytest.importorskip("wove", reason="the wove extra is part of `dev`; install it")

from wove_adapters.integration.wove import executor  # noqa: E402
from wove_adapters.testing.conformance import weave_map_100  # noqa: E402


@pytest.fixture(autouse=True)
def reset_wove() -> Any:
    yield
    wove.config(environments={"default": {"executor": "local"}}, default_environment="default")


@pytest.mark.parametrize("name", ["stdio", "process"])
def test_weave_with_a_mapped_task_of_100_items(name: str) -> None:
    wove.config(environments={"remote": {"executor": executor(name)}})
    result = weave_map_100("remote")
    assert all(pid != os.getpid() for _, pid in result.double)


def test_errors_keep_their_type_through_wove() -> None:
    wove.config(environments={"remote": {"executor": executor("stdio")}})
    with wove.weave() as w:

        @w.do(environment="remote")
        def broken() -> None:
            raise KeyError("missing")

    with pytest.raises(KeyError, match="missing"):
        w.result.broken  # noqa: B018 - wove raises a task's error on access


def test_a_weave_costs_milliseconds_once_warm() -> None:
    wove.config(environments={"remote": {"executor": executor("stdio")}})

    def one_weave() -> float:
        start = time.perf_counter()
        with wove.weave() as w:

            @w.do(environment="remote")
            def ping() -> int:
                return 1

        assert w.result.ping == 1
        return time.perf_counter() - start

    one_weave()  # warm: worker processes start once per process
    durations = sorted(one_weave() for _ in range(10))
    # Recorded for the closing note; wove's own backend path costs ~500 ms per weave.
    print(f"weave with one remote task, p50 {durations[5] * 1000:.1f} ms")


def test_unknown_executor_name_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="Unknown executor"):
        executor("no-such-backend")
