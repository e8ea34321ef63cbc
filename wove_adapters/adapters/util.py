"""Caller-side helpers the backend adapters share; none of them talks to a backend.

Watching a backend's future as the run's way back (Dask, Ray): the run it stands for,
the ``task_error`` an exception in it becomes (a refused payload's is the transport's
PayloadError naming the key), and the bounded memory of how finished runs ended. The
worker command line and ``doctor`` rows. Batching a loop iteration's calls lives in
``core.aio``, payload-store chores in ``core.stores``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from wove_adapters.core import frames
from wove_adapters.core import stores as payload_mod
from wove_adapters.core.codec import attach_remote_traceback
from wove_adapters.core.errors import PayloadError, redact_url

Row = tuple[str, bool, str]  # a doctor row: what, ok, detail (what to do when not ok)
T = TypeVar("T")
V = TypeVar("V")

# ---------------------------------------------------------------- a future as the way back


@dataclass
class Watched:
    """A run whose backend future is watched: the future's end becomes its terminal
    event, so no run waits for a reconciliation tick."""

    run_id: str
    task_id: str
    attempt: int


def failure_frame(
    run: Watched, exc: BaseException, *, native: bool, remote_tb: str = ""
) -> dict[str, Any]:
    """The ``task_error`` for an exception the future carries: a payload body that could
    not be read, the task raised (``native`` return path) or our worker function failed.
    ``remote_tb`` (the task's own frames, as the worker saw them) is chained to the
    caller's exception as ``concurrent.futures`` does it."""
    source = "payload" if isinstance(exc, PayloadError) else ("task" if native else "worker")
    frame = frames.error_event(run.run_id, run.task_id, exc, attempt=run.attempt, source=source)
    if remote_tb:
        frame["error"]["traceback"] = remote_tb
        attach_remote_traceback(exc, remote_tb)
    return frame


def refusal_frame(executor: str, run: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The run's error when its worker refused the payload (``RunState.REFUSED``), for an
    adapter that emits its runs' events itself (a future or a workflow result as the way
    back): the transport's PayloadError naming the signing key (``executor_config``'s
    ``_key_id``) and the fix. ``run`` has ``run_id``, ``task_id`` and ``attempt``."""
    from wove_adapters.callbacks.inbox import refused_event

    return refused_event(executor, run, str(config.get("_key_id", "?")))


class FinishedStates(Generic[V]):
    """How the last ``size`` released runs ended, for ``status`` after the backend's
    handle is gone (oldest forgotten first)."""

    def __init__(self, size: int = 10_000) -> None:
        self._states: OrderedDict[str, V] = OrderedDict()
        self._size = size

    def remember(self, handle: str, state: V) -> None:
        self._states[handle] = state
        while len(self._states) > self._size:
            self._states.popitem(last=False)

    def forget(self, handle: str) -> None:
        self._states.pop(handle, None)

    def get(self, handle: str, default: V) -> V:
        return self._states.get(handle, default)


# ---------------------------------------------------------------- jobs that run the worker


def worker_command(python: str, *args: str) -> list[str]:
    """The command a batch job's container or script runs: one payload, then exit."""
    return [python, "-m", "wove_adapters.worker", *args]


async def checked_row(
    label: str,
    check: Awaitable[T],
    ok: str | Callable[[T], str],
    failed: Callable[[Exception], str],
    *,
    errors: type[Exception] | tuple[type[Exception], ...] = Exception,
) -> Row:
    """One ``doctor`` row from one check: a failure is a row that says what to do."""
    try:
        value = await check
    except errors as exc:
        return (label, False, failed(exc))
    return (label, True, ok if isinstance(ok, str) else ok(value))


async def store_row(url: str | None, readers: str) -> Row:
    """The ``doctor`` row of the payload store at ``url`` (None: the default store),
    probed off the loop. ``readers`` (who reads the payloads there) goes in the detail;
    the URL is shown without its password."""
    url = url or payload_mod.default_store_url()
    where = redact_url(url)
    s3 = " (S3 bucket)" if url.startswith("s3:") else ""
    return await checked_row(
        f"payload store reachable{s3}", asyncio.to_thread(payload_mod.probe, url),
        f"{where} (write, read, delete; {readers})",
        lambda exc: f"{where}: {exc}; the caller writes payloads here and {readers}")
