"""The worker side: verify a payload, run its task, report events, never lose the outcome.

Any backend's worker runs a payload with one call: ``run(payload)`` from sync code (a
Celery or RQ task body), ``await arun(payload)`` from async code (ARQ, Taskiq), or
``python -m wove_adapters.worker`` from a batch script. The payload is verified before
anything is unpickled. The task runs in the calling thread (so SIGTERM can interrupt it);
heartbeats come from a timer thread; the terminal event is acknowledged by the caller, or,
when the caller cannot be reached, written to the ledger the envelope names.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

from wove_adapters.callbacks import payload as payload_mod
from wove_adapters.callbacks import sender
from wove_adapters.callbacks.payload import Envelope
from wove_adapters.core import frames
from wove_adapters.core.errors import PayloadError

EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_PAYLOAD_REFUSED = 2
EXIT_DELIVERY_FAILED = 3
EXIT_CANCELLED = 143


class TaskCancelled(BaseException):
    """Raised inside a running task when its run is cancelled (SIGTERM, cancel frame).

    A BaseException so ``except Exception`` in user code does not swallow it."""


@dataclass
class Outcome:
    state: str  # succeeded | failed | cancelled | refused
    value: Any = None
    error: BaseException | None = None
    delivered: bool = True

    @property
    def exit_code(self) -> int:
        if not self.delivered:
            return EXIT_DELIVERY_FAILED
        return {
            "succeeded": EXIT_OK,
            "failed": EXIT_TASK_FAILED,
            "cancelled": EXIT_CANCELLED,
        }.get(self.state, EXIT_PAYLOAD_REFUSED)


# ---------------------------------------------------------------- running one callable


def call_task(func: Callable[..., Any], args: dict[str, Any]) -> Any:
    """Call sync or async task code from this (non-loop) thread."""
    result = func(**args)
    if inspect.isawaitable(result):
        import asyncio  # only async task code pays for it

        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


@contextmanager
def sigterm_cancels() -> Iterator[None]:
    """Within the block, SIGTERM raises TaskCancelled in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _handler(signum: int, frame: FrameType | None) -> None:
        raise TaskCancelled(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Heart:
    """One daemon thread beats for every running task in this process (a worker running
    thousands of short tasks must not start a thread per task)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._beats: dict[int, tuple[float, float, Callable[[], object]]] = {}
        self._thread: threading.Thread | None = None
        self._next_id = 0

    def add(self, interval: float, beat: Callable[[], object]) -> int:
        """Call ``beat`` every ``interval`` s; a number it returns sets the next delay."""
        with self._cond:
            self._next_id += 1
            ident = self._next_id
            self._beats[ident] = (interval, time.monotonic() + interval, beat)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, daemon=True, name="wove-heartbeat"
                )
                self._thread.start()
            self._cond.notify()
            return ident

    def remove(self, ident: int) -> None:
        with self._cond:
            self._beats.pop(ident, None)

    def _loop(self) -> None:
        while True:
            due: list[tuple[int, Callable[[], object]]] = []
            with self._cond:
                now = time.monotonic()
                wake = now + 60.0
                for ident, (interval, at, beat) in list(self._beats.items()):
                    if at <= now:
                        due.append((ident, beat))
                        at = now + interval
                        self._beats[ident] = (interval, at, beat)
                    wake = min(wake, at)
                if not due:
                    self._cond.wait(max(wake - now, 0.005))
            for ident, beat in due:
                try:
                    delay = beat()
                except Exception:  # a lost heartbeat must not kill the task
                    continue
                if isinstance(delay, (int, float)):
                    with self._cond:
                        entry = self._beats.get(ident)
                        if entry is not None:
                            self._beats[ident] = (entry[0], time.monotonic() + delay, entry[2])


_HEART = _Heart()


class HeartbeatTimer:
    """Calls ``beat`` every ``interval`` seconds while the block runs (shared thread)."""

    def __init__(self, interval: float | None, beat: Callable[[], object]) -> None:
        self._interval = interval
        self._beat = beat
        self._ident: int | None = None

    def __enter__(self) -> HeartbeatTimer:
        if self._interval:
            self._ident = _HEART.add(self._interval, self._beat)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ident is not None:
            _HEART.remove(self._ident)


def heartbeat_interval(heartbeat_seconds: float | None) -> float:
    """Beat three times per allowed silence, and at least every 5 s so reconciliation and
    observers always see life."""
    if heartbeat_seconds:
        return max(min(heartbeat_seconds / 3.0, 5.0), 0.05)
    return 5.0


def pickled_exception(exc: BaseException) -> bytes | None:
    try:
        data = payload_mod.dumps(exc)
        payload_mod.loads(data)
        return data
    except Exception:
        return None


# ---------------------------------------------------------------- the payload runner


def _emit(
    envelope: Envelope, event: frames.WireEvent, budget: float = sender.HEARTBEAT_BUDGET
) -> None:
    """Deliver one event now (heartbeats and task_started get a short budget: a later
    event supersedes them; the terminal event gets the full retry budget)."""
    try:
        sender.post(envelope.return_path, envelope.key_id, [event], budget=budget)
    except sender.DeliveryFailed as exc:
        if budget > sender.HEARTBEAT_BUDGET:
            raise
        print(f"wove-adapters worker: an event was not delivered: {exc}", file=sys.stderr)


def _refuse(raw: str | bytes, exc: PayloadError) -> Outcome:
    """Report a refused payload where it claims to come from, if we can sign for it."""
    print(f"wove-adapters worker: payload refused: {exc}", file=sys.stderr)
    try:
        import base64

        import msgspec

        from wove_adapters.callbacks import signing

        text = raw.decode() if isinstance(raw, bytes) else raw
        blob = signing.decode_blob(
            base64.urlsafe_b64decode(text.strip()[len(payload_mod.PAYLOAD_PREFIX) :])
        )
        claimed = msgspec.msgpack.decode(blob.body, type=Envelope)
        signing.KEYRING.get(claimed.key_id)
        event = frames.TaskError(
            run_id=claimed.run_id,
            task_id=claimed.task_id,
            attempt=claimed.attempt,
            error=frames.ErrorPayload(
                kind="PayloadError", message=f"worker refused the payload: {exc}", source="payload"
            ),
        )
        _emit(claimed, event, budget=10.0)
    except Exception:
        pass
    return Outcome("refused", error=exc, delivered=True)


def run(payload: str | bytes, *, handle_sigterm: bool = True) -> Outcome:
    """Run one payload to completion from sync code; see the module docstring."""
    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError as exc:
        return _refuse(payload, exc)
    return run_envelope(envelope, handle_sigterm=handle_sigterm)


# A task that ends within this many seconds sends only its terminal event: one request
# per short task instead of two. Longer tasks report task_started at this point.
STARTED_AFTER = 0.05


class _Pulse:
    """First tick: task_started; then heartbeats at the policy's interval."""

    def __init__(self, envelope: Envelope, ident: dict[str, Any]) -> None:
        self.envelope = envelope
        self.ident = ident
        self.started = False
        self.every = heartbeat_interval(envelope.heartbeat_seconds)

    def beat(self) -> float:
        if not self.started:
            self.started = True
            _emit(
                self.envelope,
                frames.TaskStarted(**self.ident, pid=os.getpid(), host=socket.gethostname()),
            )
        else:
            _emit(self.envelope, frames.Heartbeat(**self.ident))
        return self.every


def run_envelope(envelope: Envelope, *, handle_sigterm: bool = True) -> Outcome:
    ident: dict[str, Any] = {
        "run_id": envelope.run_id,
        "task_id": envelope.task_id,
        "attempt": envelope.attempt,
    }
    outcome: Outcome
    event: frames.WireEvent
    pulse = _Pulse(envelope, ident)
    with HeartbeatTimer(STARTED_AFTER, pulse.beat):
        try:
            func, args = payload_mod.load_body(envelope)
            if handle_sigterm:
                with sigterm_cancels():
                    value = call_task(func, args)
            else:
                value = call_task(func, args)
            event = frames.TaskResult(**ident, result=payload_mod.dumps(value))
            outcome = Outcome("succeeded", value=value)
        except TaskCancelled as exc:
            event = frames.TaskCancelled(**ident, reason=str(exc))
            outcome = Outcome("cancelled", error=exc)
        except PayloadError as exc:
            event = frames.TaskError(
                **ident, error=frames.normalize_exception(exc, source="payload")
            )
            outcome = Outcome("refused", error=exc)
        except Exception as exc:
            event = frames.TaskError(
                **ident,
                error=frames.normalize_exception(exc, source="task"),
                exception=pickled_exception(exc),
            )
            outcome = Outcome("failed", error=exc)
    outcome.delivered = deliver_terminal(envelope, event)
    return outcome


def deliver_terminal(envelope: Envelope, event: frames.WireEvent) -> bool:
    """Get the terminal event to the caller, or into the ledger; False if both fail."""
    detach = envelope.delivery.get("delivery_orphan_policy") == "detach"
    recorded = bool(detach and envelope.ledger and _record_in_ledger(envelope, event))
    # Once the ledger holds the outcome, a gone caller is no reason to linger.
    wait = 5.0 if recorded else sender.RETRY_SECONDS
    try:
        _emit(envelope, event, budget=wait)
        return True
    except Exception as exc:
        print(f"wove-adapters worker: could not deliver the outcome: {exc}", file=sys.stderr)
        if envelope.ledger and not recorded:
            return _record_in_ledger(envelope, event)
        return recorded


_STATE_OF = {
    frames.TASK_RESULT: "succeeded",
    frames.TASK_ERROR: "failed",
    frames.TASK_CANCELLED: "cancelled",
}


def _record_in_ledger(envelope: Envelope, event: frames.WireEvent) -> bool:
    from wove_adapters.core.ledger import record_outcome_sync

    blob = sender.sign_events([event], envelope.key_id)
    from wove_adapters.callbacks.signing import encode_blob

    kind = type(event).__struct_config__.tag
    try:
        record_outcome_sync(
            envelope.ledger or "",
            envelope.run_id,
            _STATE_OF.get(str(kind), "failed"),
            encode_blob(blob),
        )
        return True
    except Exception as exc:
        print(f"wove-adapters worker: could not record the outcome: {exc}", file=sys.stderr)
        return False


async def arun(payload: str | bytes) -> Outcome:
    """Run a payload from async code: the task runs in a thread so it never blocks the
    caller's loop (ARQ and Taskiq workers serve many jobs on one loop)."""
    import asyncio

    return await asyncio.to_thread(run, payload, handle_sigterm=False)


# ---------------------------------------------------------------- python -m wove_adapters.worker


def read_payload(argv: list[str]) -> str:
    """From ``--payload-file PATH``, ``--payload-env VAR``, ``--payload-ref URL#KEY``,
    ``-`` (stdin), or the default env var ``WOVE_PAYLOAD``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m wove_adapters.worker")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--payload-file")
    source.add_argument("--payload-env")
    source.add_argument("--payload-ref", help="STORE_URL#KEY: the payload text in a store")
    source.add_argument("payload", nargs="?", help="'-' for stdin")
    options = parser.parse_args(argv)
    if options.payload_file:
        with open(options.payload_file) as handle:
            return handle.read()
    if options.payload_ref:
        url, _, key = options.payload_ref.rpartition("#")
        store = payload_mod.open_store(url)
        return store._get(key).decode()
    if options.payload == "-":
        return sys.stdin.read()
    if options.payload:
        return str(options.payload)
    var = options.payload_env or "WOVE_PAYLOAD"
    value = os.environ.get(var)
    if not value:
        parser.error(f"no payload: ${var} is empty and no --payload-file/--payload-ref given")
    return value


def main(argv: list[str] | None = None) -> int:
    text = read_payload(list(sys.argv[1:] if argv is None else argv))
    outcome = run(text)
    return outcome.exit_code
