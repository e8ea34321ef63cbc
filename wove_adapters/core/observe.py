"""The observer seam: how traces and metrics (``wove_adapters.observability``) see runs.

The dispatcher (``core.runtime``) and the receiver (``callbacks.receiver``) call the hooks
below at the points of a run's life an observer cares about; an observer installed with
``install`` receives them. Nothing here imports an observability library, or anything
above core: the implementations live in ``wove_adapters.observability`` and are imported
only when a user turns them on. With no observer installed each hook site costs one
truth test of ``observers`` (an empty list), so a process that observes nothing pays
nothing measurable (benchmarks/bench_observe.py).

Hooks run on the shared loop (receiver rejections on the receiver's loop, which is the
same one) and must not block; an observer that raises is logged and kept, the run is
never touched by it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from wove_adapters.core import frames

if TYPE_CHECKING:
    from wove_adapters.core.runtime import Run

log = logging.getLogger("wove_adapters.observe")

# Every observer installed in this process, in order. Hook sites test it before calling
# (``if observe.observers:``), so an empty list costs one attribute read per site.
observers: list[Observer] = []

# The outcome label of a run or attempt: a bounded set, never a run id or a message.
OUTCOMES = ("succeeded", "failed", "cancelled", "timeout", "lost", "detached", "requeued",
            "retried")


class Observer(Protocol):
    """What a run's life looks like to an observer. ``environment`` and ``executor`` name
    the dispatcher; ``run`` is the runtime's record of the run (read it, never change it,
    except ``run.attempt.extra["trace"]``, which ``attempt_launched`` may set: the W3C
    trace context the payload carries to the worker)."""

    def run_submitted(self, environment: str, executor: str, run: Run) -> None:
        """A new run was accepted (not a call attached to another run by its key)."""

    def attempt_launched(self, environment: str, executor: str, run: Run) -> None:
        """An attempt is about to be handed to the backend (``run.attempt.attempt``)."""

    def attempt_started(self, environment: str, executor: str, run: Run) -> None:
        """The worker said ``task_started`` for the current attempt."""

    def attempt_ended(
        self, environment: str, executor: str, run: Run, outcome: str, reason: str
    ) -> None:
        """The current attempt is over: ``requeued``/``retried`` (another attempt of the
        same run follows) or the run's own outcome (``run_ended`` follows)."""

    def run_ended(
        self, environment: str, executor: str, run: Run, frame: dict[str, Any], outcome: str
    ) -> None:
        """The run's one terminal event reached its caller (``frame``)."""

    def receiver_rejected(self, reason: str) -> None:
        """The callback receiver refused a request (``reason``: a short fixed word)."""


def install(observer: Observer) -> None:
    """Start sending hooks to ``observer`` (once: installing it again changes nothing)."""
    if not any(existing is observer for existing in observers):
        observers.append(observer)


def uninstall(observer: Observer) -> None:
    observers[:] = [existing for existing in observers if existing is not observer]


def outcome_of(frame: dict[str, Any]) -> str:
    """The outcome label of a terminal frame (one of ``OUTCOMES``)."""
    kind = frame.get("type")
    if kind == frames.TASK_RESULT:
        return "succeeded"
    if kind == frames.TASK_CANCELLED:
        return "cancelled"
    error = frame.get("error") or {}
    source = error.get("source")
    if source == "timeout":
        return "timeout"
    if source == "orphan":
        return "detached" if error.get("kind") == "DeliveryDetachedError" else "lost"
    return "failed"


def _each(method: str, *args: Any) -> None:
    for observer in list(observers):
        try:
            getattr(observer, method)(*args)
        except Exception:
            log.exception("observer %r failed in %s", observer, method)


def run_submitted(environment: str, executor: str, run: Run) -> None:
    _each("run_submitted", environment, executor, run)


def attempt_launched(environment: str, executor: str, run: Run) -> None:
    _each("attempt_launched", environment, executor, run)


def attempt_started(environment: str, executor: str, run: Run) -> None:
    _each("attempt_started", environment, executor, run)


def attempt_ended(environment: str, executor: str, run: Run, outcome: str, reason: str) -> None:
    _each("attempt_ended", environment, executor, run, outcome, reason)


def run_ended(environment: str, executor: str, run: Run, frame: dict[str, Any]) -> None:
    outcome = outcome_of(frame)
    _each("attempt_ended", environment, executor, run, outcome, "")
    _each("run_ended", environment, executor, run, frame, outcome)


def receiver_rejected(reason: str) -> None:
    _each("receiver_rejected", reason)
