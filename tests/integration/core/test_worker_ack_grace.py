"""The worker's slot before the caller's acknowledgement (``worker.runner.deliver_terminals``
with ``worker.sender.try_first``): against real HTTP servers that answer late, a finished
task's delivery returns within the grace with its outcome already in the ledger, the
outbox reads the late answer, and a request left in flight never blocks the outbox."""

from __future__ import annotations

import http.server
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from wove_adapters.core import envelope as payload_mod
from wove_adapters.core import frames, signing
from wove_adapters.worker import runner, sender


class _SlowReceiver:
    """Answers every POST with 200 after ``delay`` seconds (one thread per connection),
    the first one after ``first_delay`` more; with ``hang_up``, it closes the connection
    after each answer without saying so (as a server whose keep-alive timeout ran out
    does). ``posts`` counts the requests it read."""

    def __init__(self, delay: float, *, first_delay: float = 0.0, hang_up: bool = False
                 ) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts += 1
                time.sleep(receiver.delay + (first_delay if receiver.posts == 1 else 0.0))
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                self.wfile.flush()
                if hang_up:
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.delay = delay
        self.posts = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/wove/events/t"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def slow() -> Iterator[list[_SlowReceiver]]:
    made: list[_SlowReceiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _terminal(url: str, ledger: str = "") -> tuple[payload_mod.Envelope, frames.TaskResult]:
    run_id = f"t:{uuid.uuid4().hex}"
    envelope = payload_mod.Envelope(
        adapter="process", run_id=run_id, task_id="t", environment="p",
        return_path=payload_mod.ReturnPath(kind="http", url=url),
        key_id=signing.KEYRING.generate(), ledger=ledger,
    )
    return envelope, frames.TaskResult(run_id=run_id, task_id="t",
                                       result=payload_mod.dumps(42))


def test_a_late_answer_frees_the_slot_with_the_outcome_recorded(
    slow: list[_SlowReceiver], tmp_path: Path
) -> None:
    from wove_adapters.core.ledger import open_ledger
    from wove_adapters.core.loop import run_sync

    receiver = _SlowReceiver(1.0)
    slow.append(receiver)
    ledger = f"sqlite:///{tmp_path / 'runs.db'}"
    envelope, event = _terminal(receiver.url, ledger)
    outcome = runner.Outcome(runner.RunState.SUCCEEDED, event=event)
    started = time.monotonic()
    assert runner.deliver_terminal(envelope, event, outcome) is True
    took = time.monotonic() - started
    # Returned before the answer (1 s away), with the outcome already in the ledger.
    assert took < 0.9, took
    assert outcome.pending is not None and not outcome.pending.settled.is_set()
    record = run_sync(open_ledger(ledger).get(envelope.run_id), 30)
    assert record is not None and record.state == "succeeded", record
    # The outbox reads the answer still on its way: delivered, not sent again.
    assert outcome.pending.wait(30) == sender.DELIVERED
    assert receiver.posts == 1


def test_a_request_in_flight_never_blocks_the_outbox(slow: list[_SlowReceiver]) -> None:
    """The outbox is busy with a slow destination while an older event for a second
    destination waits in its round; meanwhile a task leaves a request in flight on that
    second destination. The older event must not wait for the connection the request
    in flight holds (only the outbox itself frees it): both are delivered."""
    busy, late = _SlowReceiver(1.0), _SlowReceiver(0.5)
    slow.extend([busy, late])
    first = [sender.Pending(
        payload_mod.ReturnPath(kind="http", url=receiver.url), key_id, [event], label=label,
    ) for receiver, label in ((busy, "busy"), (late, "older"))
        for envelope, event in [_terminal(receiver.url)] for key_id in [envelope.key_id]]
    for item in first:
        sender.OUTBOX.put(item)  # one round: the busy one, then the older one
    time.sleep(0.2)  # the outbox is inside the busy destination's request now
    envelope, event = _terminal(late.url)
    outcome = runner.Outcome(runner.RunState.SUCCEEDED, event=event)
    assert runner.deliver_terminal(envelope, event, outcome) is True
    assert outcome.pending is not None  # sent, its answer not there within the grace
    for item in [*first, outcome.pending]:
        assert item.wait(20) == sender.DELIVERED, item.label


# Several runs of one worker process share its one connection to their caller (ARQ's
# payload threads, a chunk's runs): the connection is held, or gone, between them.


def _event() -> frames.TaskResult:
    return frames.TaskResult(run_id=f"t:{uuid.uuid4().hex}", task_id="t",
                             result=payload_mod.dumps(42))


def test_a_try_behind_a_late_answer_waits_for_the_connection(
    slow: list[_SlowReceiver],
) -> None:
    """Delivered inline (up to its grace), not turned away into the ledger and outbox."""
    receiver = _SlowReceiver(0.0, first_delay=0.3)
    slow.append(receiver)
    path = payload_mod.ReturnPath(kind="http", url=receiver.url)
    key_id = signing.KEYRING.generate()
    first = _event()
    inflight = sender.try_first(path, key_id, [first], 0.05)
    assert inflight is not True and inflight is not False  # sent; its answer is late
    late = sender.OUTBOX.put(
        sender.Pending(path, key_id, [first], label="late", inflight=inflight))
    started = time.monotonic()
    assert sender.try_first(path, key_id, [_event()], 1.0) is True
    assert time.monotonic() - started < 1.0
    assert late.wait(10) == sender.DELIVERED
    assert receiver.posts == 2


def test_a_connection_closed_while_idle_is_replaced(slow: list[_SlowReceiver]) -> None:
    receiver = _SlowReceiver(0.0, hang_up=True)
    slow.append(receiver)
    path = payload_mod.ReturnPath(kind="http", url=receiver.url)
    key_id = signing.KEYRING.generate()
    for _ in range(3):
        assert sender.try_first(path, key_id, [_event()], 1.0) is True
        time.sleep(0.1)  # the receiver has closed the connection by now
    assert receiver.posts == 3
