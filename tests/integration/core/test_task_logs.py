"""Task logs come home (docs/observability.md, "Logs"), through real worker processes of
the ``process`` executor (one ``python -m wove_adapters.worker`` per task, signed events
to the receiver) and of ``stdio`` (a pool over pipes): records arrive in the caller under
``wove_adapters.task`` with their attributes, filtered by level, limited and counted."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))
import task_logs as tl
from hubs import hub_factory

from wove_adapters import Hub
from wove_adapters.worker import tasklogs as worker_logs

records = tl.records  # the fixture: what the caller emitted during the test

EXECUTORS = ["process", "stdio"]


@pytest.fixture(params=EXECUTORS)
def hub_with(request: pytest.FixtureRequest) -> Iterator[Callable[..., Hub]]:
    """``hub_with(**settings)``: a Hub whose one environment (``logs-<executor>-<id>``) runs on
    the executor under test with ``settings``; ``config`` adds executor_config."""
    executor = request.param
    with hub_factory(f"logs-{executor}") as make:

        def build(config: dict[str, Any] | None = None, **settings: Any) -> Hub:
            executor_config = {"processes": 1} if executor == "stdio" else {}
            executor_config.update(config or {})
            # A name of its own: dispatchers (and their stats) are shared per environment.
            return make({"executor": executor, "executor_config": executor_config, **settings},
                        name=f"logs-{executor}-{uuid.uuid4().hex[:8]}")

        yield build


def test_records_arrive_with_their_attributes(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO")
    tl.chatty_arrives(hub, records, 3)
    assert hub.dispatcher(hub.config.default_environment).stats["task_logs_emitted"] == 3


def test_level_filtering(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    hub = hub_with(task_logs="warning")
    hub.run(tl.chatty, 1)
    assert [r.getMessage() for r in records.of("tests.chatty")] == ["warning 1", "failed 1"]


def test_a_task_setting_beats_its_environment(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    """Off for the environment, DEBUG for one call's task; on for the environment, off
    for a task in the tasks table."""
    quiet = hub_with()
    quiet.run(tl.chatty, 1, task_options={"task_logs": "debug"})
    assert [r.getMessage() for r in records.of("tests.chatty")] == [
        "debug 1", "info 1", "warning 1", "failed 1"]
    records.records.clear()
    loud = hub_with(task_logs="DEBUG")
    loud.run(tl.chatty, 2, task_options={"task_logs": "off"})
    loud.run(tl.chatty, 3, task_options={"task_logs": False})
    assert records.of("tests.chatty") == []


def test_off_means_none(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    tl.nothing_arrives(hub_with(), records)


def test_output_lines_only_when_asked(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_output=True)
    hub.run(tl.printer, 7)
    assert [(r.getMessage(), r.levelname) for r in records.of("stdout")] == [
        ("out 7", "INFO"), ("unfinished 7", "INFO")]
    assert [(r.getMessage(), r.levelname) for r in records.of("stderr")] == [
        ("err 7", "WARNING")]
    assert records.of("tests.printer") == []  # task_logs is off: records stay
    records.records.clear()
    hub.run(tl.printer, 8, task_options={"task_logs": "INFO"})
    assert [r.getMessage() for r in records.of("tests.printer")] == ["record 8"]
    # Printed once, captured once: the tee does not also make a record of the line.
    assert [r.getMessage() for r in records.of("stdout")] == ["out 8", "unfinished 8"]


def test_rate_limit_drops_are_counted_exactly(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO")
    count = 1000
    hub.run(tl.flood, count)
    kept = records.of("tests.flood")
    summary = records.of("wove_adapters")
    assert len(summary) == 1, [r.getMessage() for r in summary]
    dropped = summary[0].dropped_records  # type: ignore[attr-defined]
    assert dropped > 0 and f"{dropped} records dropped" in summary[0].getMessage()
    assert len(kept) + dropped == count
    assert len(kept) >= worker_logs.BURST
    # The ones kept are the first ones, in order (the bucket refills slowly after).
    numbers = [int(r.getMessage().split()[0]) for r in kept]
    assert numbers[: worker_logs.BURST] == list(range(worker_logs.BURST))
    assert numbers == sorted(numbers)


def test_a_long_message_is_cut_at_the_cap(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO")
    hub.run(tl.big, 20_000)
    (record,) = records.of("tests.big")
    message = record.getMessage()
    cap = worker_logs.MAX_MESSAGE
    assert message.startswith("y" * cap)
    assert message == "y" * cap + f"... [{20_000 - cap} bytes cut]"


def test_the_caller_caps_each_run(hub_with: Callable[..., Hub], records: tl.Collected) -> None:
    hub = hub_with({"task_logs_max_records": 50}, task_logs="INFO")
    hub.run(tl.flood, 120)  # within the worker's burst: all 120 are sent
    assert len(records.of("tests.flood")) == 50
    warnings = [r for r in records.records if "later records are dropped" in r.getMessage()]
    assert len(warnings) == 1
    stats = hub.dispatcher(hub.config.default_environment).stats
    assert stats["task_logs_dropped"] == 70
    # And by bytes: 3 records of 10 KB fit in 32 KB, the rest do not.
    records.records.clear()
    tight = hub_with({"task_logs_max_bytes": 32_000}, task_logs="INFO")
    tight.run(tl.flood, 10, 10_000)
    assert len(records.of("tests.flood")) == 3


def test_threads_the_task_starts_are_not_followed(
    hub_with: Callable[..., Hub], records: tl.Collected
) -> None:
    hub = hub_with(task_logs="INFO")
    hub.run(tl.with_thread, 5)
    assert [r.getMessage() for r in records.of("tests.threads")] == ["from the task 5"]


def test_a_long_run_sends_its_records_while_it_runs(
    hub_with: Callable[..., Hub], records: tl.Collected, tmp_path: Path
) -> None:
    hub = hub_with(task_logs="INFO", delivery_heartbeat_seconds=0.3)
    marker = tmp_path / f"go-{uuid.uuid4().hex}"
    future = hub.submit(tl.slow_talker, str(marker))
    assert records.wait_for(lambda r: r.getMessage() == "early", 30), "no record while running"
    assert not future.done()
    marker.touch()
    assert future.result(timeout=60) == "done"
    assert [r.getMessage() for r in records.of("tests.slow")] == ["early", "late"]


def test_a_bad_setting_names_itself_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"invalid task_logs 'loud'.*e\.g\. task_logs = \"INFO\""):
        Hub(environments={"e": {"executor": "stdio", "task_logs": "loud"}},
            default_environment="e")
    with pytest.raises(ValueError, match="task_output"):
        Hub(environments={"e": {"executor": "stdio", "task_output": "maybe"}},
            default_environment="e")


def test_json_log_format_carries_the_attributes(hub_with: Callable[..., Hub]) -> None:
    """``log_format = "json"`` (the project's own handler): one line per record, with
    the task record's attributes."""
    import io
    import json

    from wove_adapters.core import logs

    stream = io.StringIO()
    logs.configure_logging("INFO", "json", stream=stream)
    try:
        hub = hub_with(task_logs="INFO")
        future = hub.submit(tl.chatty, 6)
        pid = future.result(timeout=60)
        assert tl.tasklogs.flush(10.0)
    finally:
        logs.reset_logging()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [line for line in lines if line["message"] == "failed 6"]
    assert len(failed) == 1, lines
    assert failed[0]["logger"] == "wove_adapters.task"
    assert failed[0]["run_id"] == future.run_id
    assert failed[0]["worker_pid"] == pid
    assert failed[0]["environment"] == hub.config.default_environment
    assert "ValueError: bad 6" in failed[0]["exc_info"]


def test_inside_a_wove_weave(records: tl.Collected) -> None:
    """Through the wove bridge: wove's listener gets the ``log`` frames as before (and
    ignores them: the weave's results are unchanged), and the records are emitted."""
    wove = pytest.importorskip("wove", reason="the wove extra is part of `dev`")
    from wove_adapters.integration.wove import executor

    wove.config(environments={"remote": {"executor": executor("stdio", task_logs="INFO")}})
    try:
        with wove.weave() as w:

            @w.do(environment="remote")
            def logged() -> int:
                return tl.chatty(8)

        pid = w.result.logged
    finally:
        wove.config(environments={"default": {"executor": "local"}},
                    default_environment="default")
    got = records.of("tests.chatty")
    assert [r.getMessage() for r in got] == ["info 8", "warning 8", "failed 8"]
    assert {r.__dict__["worker_pid"] for r in got} == {pid}
