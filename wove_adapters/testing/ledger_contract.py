"""The contract every ``Ledger`` passes, written once and run against each backend.

A backend's test file subclasses ``LedgerContract`` and provides one fixture, ``ledger``,
yielding a fresh, empty ledger (and cleaning up after it). Tests that need a second
process are skipped when ``ledger.shareable`` is False: skips follow the declared
capability, never the backend's name.

Needs pytest and pytest-asyncio (``asyncio_mode = "auto"``), i.e. the ``dev`` extra.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
import uuid

import pytest

from wove_adapters.core.ledger import (
    CANCELLED,
    DETACHED,
    FAILED,
    LOST,
    RUNNING,
    SUBMITTED,
    SUCCEEDED,
    Ledger,
    RunRecord,
    record_outcome_sync,
)

__all__ = ["LedgerContract", "new_record"]


def new_record(**fields: object) -> RunRecord:
    """A record with a fresh run_id; override any field."""
    values: dict[str, object] = {"run_id": f"run-{uuid.uuid4().hex}", "environment": "default"}
    values.update(fields)
    return RunRecord(**values)  # type: ignore[arg-type]


# Each racer opens the ledger and connects, says "ready", then reads a wall-clock start
# time T from stdin. Both racers claim key i at the same instant T + i * SLOT (busy-waiting
# the last stretch), so every key is contested within well under a millisecond, rather
# than one racer running ahead of the other. Prints {index: winning run_id}.
_RACER = """
import asyncio, json, sys, time
from wove_adapters.core.ledger import RunRecord, open_ledger

url, worker, prefix, count, slot = sys.argv[1:]

async def main():
    ledger = open_ledger(url)
    await ledger.get("warm-up")  # connect before the start line
    print("ready", flush=True)
    start = float(sys.stdin.readline())
    winners = {}
    for i in range(int(count)):
        at = start + i * float(slot)
        if at - time.time() > 0.003:
            await asyncio.sleep(at - time.time() - 0.002)
        while time.time() < at:
            pass
        record = RunRecord(
            run_id=f"{prefix}{worker}-{i}", environment="race", idempotency_key=f"{prefix}key-{i}"
        )
        winners[i] = (await ledger.claim(record)).run_id
    await ledger.aclose()
    print(json.dumps(winners))

asyncio.run(main())
"""

_RECORDER = """
import sys, time
from wove_adapters.core.ledger import record_outcome_sync

url, run_id, delay = sys.argv[1:]
time.sleep(float(delay))
print(record_outcome_sync(url, run_id, "succeeded", b"signed\\x00outcome"))
"""


async def _kept(ledger: Ledger, run_id: str) -> tuple[str, bytes | None]:
    """The state and outcome the ledger kept for ``run_id`` (which it must hold)."""
    stored = await ledger.get(run_id)
    assert stored is not None, f"the ledger lost run {run_id}"
    return stored.state, stored.outcome


async def _python(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _finish(process: asyncio.subprocess.Process, timeout: float = 60) -> str:
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode == 0, stderr.decode()
    return stdout.decode()


class LedgerContract:
    """What ``wove_adapters.core.ledger.base.Ledger`` promises, as tests."""

    # --- claim -----------------------------------------------------------------------

    async def test_claim_new_key_wins(self, ledger: Ledger) -> None:
        record = new_record(idempotency_key="k-new")
        assert await ledger.claim(record) == record
        assert await ledger.get(record.run_id) == record

    async def test_claim_without_key_inserts(self, ledger: Ledger) -> None:
        first, second = new_record(), new_record()
        assert (await ledger.claim(first)).run_id == first.run_id
        assert (await ledger.claim(second)).run_id == second.run_id
        assert len(await ledger.list_runs()) == 2

    @pytest.mark.parametrize("holding", [SUBMITTED, RUNNING, DETACHED])
    async def test_second_claim_returns_the_holder(self, ledger: Ledger, holding: str) -> None:
        first = new_record(idempotency_key="k-held")
        await ledger.claim(first)
        if holding != SUBMITTED:
            await ledger.update(first.run_id, state=holding)
        owner = await ledger.claim(new_record(idempotency_key="k-held"))
        assert owner.run_id == first.run_id
        assert owner.state == holding
        assert len(await ledger.list_runs()) == 1

    async def test_claim_after_success_returns_the_outcome(self, ledger: Ledger) -> None:
        first = new_record(idempotency_key="k-done")
        await ledger.claim(first)
        assert await ledger.set_outcome(first.run_id, SUCCEEDED, b"result")
        owner = await ledger.claim(new_record(idempotency_key="k-done"))
        assert (owner.run_id, owner.state, owner.outcome) == (first.run_id, SUCCEEDED, b"result")

    @pytest.mark.parametrize("ending", [FAILED, CANCELLED, LOST])
    async def test_claim_after_failure_frees_the_key(self, ledger: Ledger, ending: str) -> None:
        first = new_record(idempotency_key="k-retry")
        await ledger.claim(first)
        await ledger.set_outcome(first.run_id, ending, b"error")
        second = new_record(idempotency_key="k-retry")
        assert (await ledger.claim(second)).run_id == second.run_id
        by_key = await ledger.by_key("k-retry")
        assert by_key is not None and by_key.run_id == second.run_id
        # The first run is still there, with how it ended.
        old = await ledger.get(first.run_id)
        assert old is not None and old.state == ending

    async def test_lost_by_update_frees_the_key(self, ledger: Ledger) -> None:
        first = new_record(idempotency_key="k-lost")
        await ledger.claim(first)
        await ledger.update(first.run_id, state=LOST)
        second = new_record(idempotency_key="k-lost")
        assert (await ledger.claim(second)).run_id == second.run_id

    async def test_claim_of_the_same_run_is_idempotent(self, ledger: Ledger) -> None:
        record = new_record(idempotency_key="k-same")
        await ledger.claim(record)
        again = await ledger.claim(record)
        assert again == record
        assert len(await ledger.list_runs()) == 1

    async def test_concurrent_claims_have_one_winner(self, ledger: Ledger) -> None:
        records = [new_record(idempotency_key="k-race") for _ in range(20)]
        owners = await asyncio.gather(*(ledger.claim(r) for r in records))
        assert len({owner.run_id for owner in owners}) == 1
        assert owners[0].run_id in {r.run_id for r in records}
        assert len(await ledger.list_runs()) == 1

    # --- set_outcome -----------------------------------------------------------------

    async def test_set_outcome_first_writer_wins(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        assert await ledger.set_outcome(record.run_id, SUCCEEDED, b"first") is True
        assert await ledger.set_outcome(record.run_id, FAILED, b"second") is False
        assert await _kept(ledger, record.run_id) == (SUCCEEDED, b"first")

    async def test_concurrent_outcomes_have_one_winner(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        outcomes = [f"outcome-{i}".encode() for i in range(10)]
        won = await asyncio.gather(
            *(ledger.set_outcome(record.run_id, SUCCEEDED, o) for o in outcomes)
        )
        assert won.count(True) == 1
        stored = await ledger.get(record.run_id)
        assert stored is not None and stored.outcome == outcomes[won.index(True)]

    async def test_outcome_none_records_state_and_leaves_room(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        assert await ledger.set_outcome(record.run_id, LOST, None) is True
        stored = await ledger.get(record.run_id)
        assert stored is not None and (stored.state, stored.outcome) == (LOST, None)
        # A detached worker that finishes later still gets its result recorded.
        assert await ledger.set_outcome(record.run_id, SUCCEEDED, b"late") is True

    async def test_set_outcome_bumps_updated_at(self, ledger: Ledger) -> None:
        record = new_record(created_at=1000.0, updated_at=1000.0)
        await ledger.claim(record)
        await ledger.set_outcome(record.run_id, SUCCEEDED, b"x")
        stored = await ledger.get(record.run_id)
        assert stored is not None and stored.updated_at > 1000.0
        assert stored.created_at == 1000.0

    async def test_set_outcome_rejects_bad_input(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        with pytest.raises(ValueError, match="terminal state"):
            await ledger.set_outcome(record.run_id, RUNNING, b"x")
        with pytest.raises(KeyError):
            await ledger.set_outcome("no-such-run", SUCCEEDED, b"x")

    # --- update ----------------------------------------------------------------------

    async def test_update_sets_fields(self, ledger: Ledger) -> None:
        record = new_record(created_at=1000.0, updated_at=1000.0)
        await ledger.claim(record)
        await ledger.update(
            record.run_id, state=RUNNING, submission="job-7", attempt=2, adapter="celery"
        )
        stored = await ledger.get(record.run_id)
        assert stored is not None
        assert (stored.state, stored.submission, stored.attempt, stored.adapter) == (
            RUNNING,
            "job-7",
            2,
            "celery",
        )
        assert stored.updated_at > 1000.0
        await ledger.update(record.run_id, submission=None)
        stored = await ledger.get(record.run_id)
        assert stored is not None and stored.submission is None and stored.state == RUNNING

    async def test_update_rejects_bad_input(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        with pytest.raises(ValueError, match="unknown field"):
            await ledger.update(record.run_id, colour="blue")
        with pytest.raises(ValueError, match="fixed"):
            await ledger.update(record.run_id, idempotency_key="other")
        with pytest.raises(ValueError, match="unknown state"):
            await ledger.update(record.run_id, state="exploded")
        with pytest.raises(ValueError, match="attempt"):
            await ledger.update(record.run_id, attempt="2")
        with pytest.raises(KeyError):
            await ledger.update("no-such-run", state=RUNNING)

    # --- states only move forward ----------------------------------------------------

    async def test_update_never_moves_a_state_backwards(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        await ledger.update(record.run_id, state=RUNNING)
        await ledger.update(record.run_id, state=SUBMITTED, submission="job-1")
        stored = await ledger.get(record.run_id)
        assert stored is not None
        # The backward state is refused; the other fields of the write still apply.
        assert (stored.state, stored.submission) == (RUNNING, "job-1")
        await ledger.update(record.run_id, state=DETACHED)
        await ledger.update(record.run_id, state=RUNNING)
        stored = await ledger.get(record.run_id)
        assert stored is not None and stored.state == DETACHED

    @pytest.mark.parametrize("late", [SUBMITTED, RUNNING, DETACHED, LOST, FAILED])
    async def test_late_update_keeps_a_recorded_outcome(self, ledger: Ledger, late: str) -> None:
        record = new_record()
        await ledger.claim(record)
        assert await ledger.set_outcome(record.run_id, SUCCEEDED, b"value")
        await ledger.update(record.run_id, state=late)
        assert await _kept(ledger, record.run_id) == (SUCCEEDED, b"value")

    async def test_terminal_state_by_update_is_final(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        await ledger.update(record.run_id, state=SUCCEEDED)  # a success kept without value
        await ledger.update(record.run_id, state=LOST)
        assert await ledger.set_outcome(record.run_id, FAILED, b"other ending") is False
        stored = await ledger.get(record.run_id)
        assert stored is not None and (stored.state, stored.outcome) == (SUCCEEDED, None)
        # The same ending may still gain its signed event.
        assert await ledger.set_outcome(record.run_id, SUCCEEDED, b"value") is True
        stored = await ledger.get(record.run_id)
        assert stored is not None and (stored.state, stored.outcome) == (SUCCEEDED, b"value")

    async def test_detached_run_takes_its_outcome(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        await ledger.update(record.run_id, state=DETACHED)
        assert await ledger.set_outcome(record.run_id, SUCCEEDED, b"later") is True
        stored = await ledger.get(record.run_id)
        assert stored is not None and (stored.state, stored.outcome) == (SUCCEEDED, b"later")

    async def test_outcome_and_late_update_race(self, ledger: Ledger) -> None:
        # A worker's outcome and the caller's queued hand-off write, in either order and
        # interleaved: the run always ends succeeded with its outcome.
        records = [new_record() for _ in range(20)]
        for record in records:
            await ledger.claim(record)
        writes = []
        for i, record in enumerate(records):
            pair = [
                ledger.set_outcome(record.run_id, SUCCEEDED, b"won"),
                ledger.update(record.run_id, state=DETACHED),
            ]
            writes += pair if i % 2 else pair[::-1]
        await asyncio.gather(*writes)
        for record in records:
            stored = await ledger.get(record.run_id)
            assert stored is not None and (stored.state, stored.outcome) == (SUCCEEDED, b"won")

    # --- reads -----------------------------------------------------------------------

    async def test_round_trip_of_every_field(self, ledger: Ledger) -> None:
        record = RunRecord(
            run_id="run-ü-" + uuid.uuid4().hex,
            environment="reports ✓",
            task_id="task-1",
            adapter="slurm",
            idempotency_key="k-ü",
            attempt=3,
            state=RUNNING,
            submission="12345.batch",
            outcome=bytes(range(256)),
            created_at=1234.5678901234,
            updated_at=2345.6789012345,
        )
        await ledger.claim(record)
        assert await ledger.get(record.run_id) == record
        assert await ledger.by_key("k-ü") == record

    async def test_get_and_by_key_missing(self, ledger: Ledger) -> None:
        assert await ledger.get("no-such-run") is None
        assert await ledger.by_key("no-such-key") is None

    async def test_by_key_returns_the_newest(self, ledger: Ledger) -> None:
        old = new_record(idempotency_key="k-hist", created_at=1000.0)
        await ledger.claim(old)
        await ledger.set_outcome(old.run_id, FAILED, b"e")
        new = new_record(idempotency_key="k-hist", created_at=2000.0)
        await ledger.claim(new)
        found = await ledger.by_key("k-hist")
        assert found is not None and found.run_id == new.run_id

    async def test_list_runs_order_limit_and_filters(self, ledger: Ledger) -> None:
        a = new_record(environment="east", created_at=1000.0)
        b = new_record(environment="west", created_at=3000.0)
        c = new_record(environment="east", created_at=2000.0)
        for record in (a, b, c):
            await ledger.claim(record)
        await ledger.set_outcome(c.run_id, SUCCEEDED, b"ok")
        ids = [r.run_id for r in await ledger.list_runs()]
        assert ids == [b.run_id, c.run_id, a.run_id]
        assert [r.run_id for r in await ledger.list_runs(limit=2)] == [b.run_id, c.run_id]
        east = await ledger.list_runs(environment="east")
        assert [r.run_id for r in east] == [c.run_id, a.run_id]
        done = await ledger.list_runs(state=SUCCEEDED)
        assert [r.run_id for r in done] == [c.run_id]
        pending_east = await ledger.list_runs(state=SUBMITTED, environment="east")
        assert [r.run_id for r in pending_east] == [a.run_id]
        assert await ledger.list_runs(environment="north") == []
        assert await ledger.list_runs(limit=0) == []

    async def test_list_runs_filters_past_the_first_page(self, ledger: Ledger) -> None:
        # Many newer runs of another environment must not hide an older match.
        for i in range(250):
            await ledger.claim(new_record(environment="noise", created_at=10_000.0 + i))
        target = new_record(environment="rare", created_at=1.0)
        await ledger.claim(target)
        found = await ledger.list_runs(environment="rare", limit=5)
        assert [r.run_id for r in found] == [target.run_id]

    async def test_list_runs_by_task_and_time(self, ledger: Ledger) -> None:
        a = new_record(task_id="report", created_at=1000.0)
        b = new_record(task_id="resize", created_at=2000.0)
        c = new_record(task_id="report", created_at=3000.0)
        d = new_record(task_id="report", created_at=3000.0)  # shares c's timestamp
        for record in (a, b, c, d):
            await ledger.claim(record)
        reports = [r.run_id for r in await ledger.list_runs(task_id="report")]
        assert reports[2:] == [a.run_id] and set(reports[:2]) == {c.run_id, d.run_id}
        window = await ledger.list_runs(since=1000.0, until=2000.0)
        assert [r.run_id for r in window] == [b.run_id, a.run_id]  # both bounds inclusive
        boundary = {r.run_id for r in await ledger.list_runs(until=3000.0, limit=2)}
        assert boundary == {c.run_id, d.run_id}
        assert [r.run_id for r in await ledger.list_runs(since=2000.5, task_id="resize")] == []
        later = await ledger.list_runs(task_id="report", since=2500.0, limit=1)
        assert len(later) == 1 and later[0].run_id in {c.run_id, d.run_id}

    async def test_unfinished_runs_sharing_a_submission(self, ledger: Ledger) -> None:
        # A chunk's runs (and followers of one key's job) share a handle: the query finds
        # the ones not ended, in this environment only, newest first.
        env = f"share-{uuid.uuid4().hex[:8]}"
        a = new_record(environment=env, created_at=1000.0)
        b = new_record(environment=env, created_at=2000.0)
        ended = new_record(environment=env, created_at=3000.0)
        alone = new_record(environment=env, created_at=4000.0)
        other_env = new_record(environment=f"{env}-x", created_at=5000.0)
        for record in (a, b, ended, alone, other_env):
            await ledger.claim(record)
        for record in (a, b, ended, other_env):
            await ledger.update(record.run_id, submission="job-7", state=RUNNING)
        await ledger.update(alone.run_id, submission="job-8")
        await ledger.set_outcome(ended.run_id, SUCCEEDED, b"ok")
        sharing = await ledger.unfinished_with_submission(env, "job-7")
        assert [r.run_id for r in sharing] == [b.run_id, a.run_id]
        assert [r.run_id for r in await ledger.unfinished_with_submission(env, "job-8")] == [
            alone.run_id]
        assert await ledger.unfinished_with_submission(env, "job-9") == []
        assert [r.run_id for r in await ledger.list_runs(submission="job-7", limit=10)
                if r.environment.startswith(env)] == [
            other_env.run_id, ended.run_id, b.run_id, a.run_id]

    async def test_count_runs_by_environment_adapter_and_state(self, ledger: Ledger) -> None:
        assert await ledger.count_runs() == {}
        runs = [new_record(environment="east", adapter="celery") for _ in range(3)]
        runs.append(new_record(environment="west", adapter="stdio"))
        for record in runs:
            await ledger.claim(record)
        await ledger.set_outcome(runs[0].run_id, SUCCEEDED, b"ok")
        await ledger.update(runs[1].run_id, state=RUNNING)
        assert await ledger.count_runs() == {
            ("east", "celery", SUCCEEDED): 1,
            ("east", "celery", RUNNING): 1,
            ("east", "celery", SUBMITTED): 1,
            ("west", "stdio", SUBMITTED): 1,
        }
        await ledger.delete(runs[3].run_id)
        assert ("west", "stdio", SUBMITTED) not in await ledger.count_runs()

    # --- wait_outcome ----------------------------------------------------------------

    async def test_wait_outcome_returns_when_set(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)

        async def finish_later() -> None:
            await asyncio.sleep(0.2)
            await ledger.set_outcome(record.run_id, SUCCEEDED, b"done")

        task = asyncio.create_task(finish_later())
        started = time.monotonic()
        result = await ledger.wait_outcome(record.run_id, timeout=10, poll=0.02)
        await task
        assert result is not None and result.outcome == b"done"
        assert time.monotonic() - started < 5

    async def test_wait_outcome_times_out(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        started = time.monotonic()
        assert await ledger.wait_outcome(record.run_id, timeout=0.2, poll=0.02) is None
        assert 0.2 <= time.monotonic() - started < 3

    # --- delete ----------------------------------------------------------------------

    async def test_delete_forgets_the_run_and_frees_its_key(self, ledger: Ledger) -> None:
        record = new_record(idempotency_key="k-del")
        await ledger.claim(record)
        await ledger.delete(record.run_id)
        assert await ledger.get(record.run_id) is None
        assert await ledger.by_key("k-del") is None
        assert await ledger.list_runs() == []
        other = new_record(idempotency_key="k-del")
        assert (await ledger.claim(other)).run_id == other.run_id
        await ledger.delete("no-such-run")  # forgetting nothing is fine

    # --- batched writes ----------------------------------------------------------------

    async def test_write_many_applies_in_order_and_isolates_failures(
        self, ledger: Ledger
    ) -> None:
        from wove_adapters.core.ledger.base import SetOutcome, Update

        first, second = new_record(idempotency_key="k-batch"), new_record(idempotency_key="k-batch")
        results = await ledger.write_many([
            first,
            Update(first.run_id, {"state": "running"}),
            Update("no-such-run", {"state": "running"}),  # fails alone
            SetOutcome(first.run_id, "succeeded", b"event"),
            second,  # the key is held by a succeeded run: the claim returns it
        ])
        assert isinstance(results[0], RunRecord) and results[0].run_id == first.run_id
        assert results[1] is None
        assert isinstance(results[2], KeyError)
        assert results[3] is True
        assert isinstance(results[4], RunRecord) and results[4].run_id == first.run_id
        stored = await ledger.get(first.run_id)
        assert stored is not None and stored.state == "succeeded" and stored.outcome == b"event"
        assert await ledger.get(second.run_id) is None

    # --- leases (task controls' slots, registrations, cache entries) ------------------

    async def test_lease_has_one_holder_until_it_expires(self, ledger: Ledger) -> None:
        name = f"slot-{uuid.uuid4().hex}"
        assert await ledger.lease(name, "run-a", 0.6) is None
        assert await ledger.lease(name, "run-b", 0.6) == "run-a"
        assert await ledger.lease(name, "run-a", 0.6) is None  # the holder renews
        assert await ledger.lease_holder(name) == "run-a"
        await asyncio.sleep(0.9)  # run-a died: its lease runs out
        assert await ledger.lease_holder(name) is None
        assert await ledger.lease(name, "run-b", 5) is None
        assert await ledger.lease_holder(name) == "run-b"

    async def test_lease_renew_and_drop_only_by_the_holder(self, ledger: Ledger) -> None:
        name, other = f"slot-{uuid.uuid4().hex}", f"slot-{uuid.uuid4().hex}"
        assert await ledger.lease(name, "run-a", 0.6) is None
        assert await ledger.lease(other, "run-x", 0.6) is None
        await ledger.renew_leases({name: "run-a", other: "not-the-holder"}, 5)
        await asyncio.sleep(0.9)
        assert await ledger.lease_holder(name) == "run-a"  # renewed
        assert await ledger.lease_holder(other) is None  # a stranger cannot renew it
        await ledger.drop_lease(name, "run-b")  # nor drop it
        assert await ledger.lease_holder(name) == "run-a"
        await ledger.drop_lease(name, "run-a")
        assert await ledger.lease_holder(name) is None
        await ledger.renew_leases({}, 5)  # nothing to renew is fine

    async def test_concurrent_leases_have_one_winner(self, ledger: Ledger) -> None:
        name = f"slot-{uuid.uuid4().hex}"
        results = await asyncio.gather(*(ledger.lease(name, f"run-{i}", 5) for i in range(20)))
        assert results.count(None) == 1
        winner = f"run-{results.index(None)}"
        assert {r for r in results if r is not None} == {winner}

    # --- across instances and processes ------------------------------------------------

    async def test_second_instance_sees_the_same_runs(self, ledger: Ledger) -> None:
        if not ledger.shareable:
            # Declared private: another process cannot record into it, and says so.
            from wove_adapters.core.ledger import record_outcome_sync

            with pytest.raises(ValueError, match="not shareable"):
                record_outcome_sync(ledger.url, "run", SUCCEEDED, b"x")
            return
        twin = type(ledger)(ledger.url)  # type: ignore[call-arg]
        try:
            first = new_record(idempotency_key="k-twin")
            await ledger.claim(first)
            owner = await twin.claim(new_record(idempotency_key="k-twin"))
            assert owner.run_id == first.run_id
            assert await twin.set_outcome(first.run_id, SUCCEEDED, b"twin")
            stored = await ledger.get(first.run_id)
            assert stored is not None and stored.outcome == b"twin"
        finally:
            await twin.aclose()

    async def test_one_instance_serves_another_loop_at_once(self, ledger: Ledger) -> None:
        # A sync facade drives the shared instance from its own loop thread while the
        # caller's loop keeps using it.
        record = new_record(idempotency_key="k-loops")
        await ledger.claim(record)

        async def from_the_other_loop() -> RunRecord | None:
            try:
                owner = await ledger.claim(new_record(idempotency_key="k-loops"))
                assert owner.run_id == record.run_id
                await ledger.set_outcome(record.run_id, SUCCEEDED, b"other loop")
                return await ledger.get(record.run_id)
            finally:
                await ledger.aclose()

        other = asyncio.to_thread(asyncio.run, from_the_other_loop())
        here = ledger.wait_outcome(record.run_id, timeout=30, poll=0.01)
        stored, waited = await asyncio.gather(other, here)
        assert stored is not None and stored.outcome == b"other loop"
        assert waited is not None and waited.outcome == b"other loop"
        # And this loop still works after the other one closed its side and ended.
        assert await ledger.get(record.run_id) == stored

    async def test_processes_racing_for_keys_get_one_winner_each(self, ledger: Ledger) -> None:
        if not ledger.shareable:
            # In one process, concurrent claims of one key still get one winner.
            claims = [ledger.claim(new_record(idempotency_key="k-solo")) for _ in range(20)]
            owners = {record.run_id for record in await asyncio.gather(*claims)}
            assert len(owners) == 1
            return
        count, prefix = 20, f"race-{uuid.uuid4().hex[:8]}-"
        racers = [
            await _python(_RACER, ledger.url, worker, prefix, str(count), "0.02")
            for worker in ("a", "b")
        ]
        for racer in racers:
            assert racer.stdout is not None
            line = await asyncio.wait_for(racer.stdout.readline(), 60)
            if line.strip() != b"ready":
                pytest.fail(f"racer did not start: {line!r} {await _finish(racer)}")
        start = f"{time.time() + 0.2}\n".encode()
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write(start)
        await asyncio.gather(*(racer.stdin.drain() for racer in racers if racer.stdin))
        results = [json.loads(await _finish(racer)) for racer in racers]
        wins = {"a": 0, "b": 0}
        for i in range(count):
            winner = results[0][str(i)]
            assert results[1][str(i)] == winner, f"key {i}: racers disagree"
            assert winner in (f"{prefix}a-{i}", f"{prefix}b-{i}")
            wins[winner[len(prefix)]] += 1
            loser = f"{prefix}{'b' if winner.endswith(f'a-{i}') else 'a'}-{i}"
            assert await ledger.get(loser) is None, f"key {i}: the loser was recorded too"
            owner = await ledger.by_key(f"{prefix}key-{i}")
            assert owner is not None and owner.run_id == winner
        assert sum(wins.values()) == count

    async def test_outcome_recorded_by_a_worker_process(self, ledger: Ledger) -> None:
        record = new_record()
        await ledger.claim(record)
        if not ledger.shareable:
            with pytest.raises(ValueError, match="not shareable"):
                record_outcome_sync(ledger.url, record.run_id, SUCCEEDED, b"x")
            return
        worker = await _python(_RECORDER, ledger.url, record.run_id, "0.3")
        result = await ledger.wait_outcome(record.run_id, timeout=60, poll=0.02)
        assert (await _finish(worker)).strip() == "True"
        assert result is not None
        assert (result.state, result.outcome) == (SUCCEEDED, b"signed\x00outcome")
        # A second writer, in this process and without a loop, loses.
        again = await asyncio.to_thread(
            record_outcome_sync, ledger.url, record.run_id, FAILED, b"late"
        )
        assert again is False
        with pytest.raises(KeyError):
            await asyncio.to_thread(record_outcome_sync, ledger.url, "no-such-run", SUCCEEDED, b"x")

    async def test_worker_creates_the_record_it_cannot_find(self, ledger: Ledger) -> None:
        if not ledger.shareable:
            return  # no worker can write into it (test_outcome_recorded_by_a_worker_process)
        template = new_record(task_id="t", adapter="process", attempt=2, idempotency_key="k")
        run_id = template.run_id
        created = await asyncio.to_thread(
            functools.partial(
                record_outcome_sync, ledger.url, run_id, SUCCEEDED, b"made", create=template
            )
        )
        assert created is True
        stored = await ledger.get(run_id)
        assert stored is not None
        assert (stored.state, stored.outcome, stored.task_id, stored.attempt) == (
            SUCCEEDED,
            b"made",
            "t",
            2,
        )
        assert stored.idempotency_key is None  # keys are taken by claim alone
        assert run_id in {r.run_id for r in await ledger.list_runs()}
        again = await asyncio.to_thread(
            functools.partial(
                record_outcome_sync, ledger.url, run_id, FAILED, b"second", create=template
            )
        )
        assert again is False
        # A run that exists is only ended, as without ``create``.
        existing = new_record()
        await ledger.claim(existing)
        assert await asyncio.to_thread(
            functools.partial(
                record_outcome_sync,
                ledger.url,
                existing.run_id,
                FAILED,
                b"e",
                create=new_record(run_id=existing.run_id, environment="elsewhere"),
            )
        )
        stored = await ledger.get(existing.run_id)
        assert stored is not None
        assert (stored.state, stored.environment) == (FAILED, existing.environment)
