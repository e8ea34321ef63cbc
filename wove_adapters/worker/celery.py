"""The worker side of ``celery``: the payload task your Celery workers run.

``register(app)`` adds the task ``wove_adapters.run`` to your app (``celery -A yourapp
worker`` then runs payloads); with no app at all, ``make_worker_app`` builds one
(``celery -A wove_adapters.adapters.celery:worker_app worker``). The task runs the payload
with ``wove_adapters.worker.runner`` and makes the Celery state tell the truth, writing it
itself off the task's critical path (``_StateWriter``), and only what a reader needs: a
short unkeyed run whose caller took its result writes nothing (see ``execute``); for
keyed runs its result carries the signed outcome (``Outcome.signed``) that other callers
holding the key answer from.

The settings both sides agree on live here too (the caller's side,
``adapters/celery.py``, imports them). Importing this module never imports celery, nor
anything of the caller's side.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import importlib
import json
import logging
import os
from typing import Any

log = logging.getLogger("wove_adapters.adapters.celery")

TASK_NAME = "wove_adapters.run"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# Settings both sides agree on: JSON only (the payload is signed ASCII text; nothing of
# ours needs pickle on the broker).
BASE_CONF: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "broker_connection_retry_on_startup": True,
}


def register(
    app: Any,
    *,
    name: str = TASK_NAME,
    acks_late: bool = False,
    reject_on_worker_lost: bool | None = None,
    track_started: bool = True,
    **task_options: Any,
) -> Any:
    """Add the payload task to your Celery app; ``celery -A yourapp worker`` then runs
    wove-adapters payloads. Returns the task.

    ``acks_late`` stays off by default: a worker killed mid-task then loses the message,
    and the caller's ``delivery_orphan_policy`` decides (fail, cancel, requeue, detach).
    With ``acks_late=True, reject_on_worker_lost=True`` Celery redelivers a task whose
    worker died by itself, whatever the caller's policy says (at least once).
    ``track_started`` records STARTED in the result backend (off the task's critical
    path) for a task still running after the short-task window; the task writes its own
    SUCCESS/REVOKED states where a reader needs them (see ``execute``), and Celery
    stores failures (worker lost, outcome undeliverable).
    """
    registered: dict[str, Any] = app.__dict__.setdefault("_wove_adapters_tasks", {})
    if name in registered:
        return registered[name]  # registering twice (re-imported module) is a no-op
    # Import the payload runner (cloudpickle, msgspec, aiohttp) in the worker's main
    # process, before the prefork pool forks: every child then starts warm.
    importlib.import_module("wove_adapters.worker.runner")

    def run_payload(task: Any, payload: str) -> dict[str, Any]:
        return execute(task, payload, track_started=track_started)

    options = {
        # Celery would spend two result-backend round trips per state (GET, then SET
        # + PUBLISH); ``execute`` writes each state once. Failures Celery sees itself
        # (WorkerLostError, revoke) are still stored.
        "ignore_result": True,
        "store_errors_even_if_ignored": True,
        **task_options,
    }
    registered[name] = app.task(
        name=name,
        bind=True,
        acks_late=acks_late,
        reject_on_worker_lost=reject_on_worker_lost,
        track_started=False,
        **options,
    )(run_payload)
    return registered[name]


def execute(task: Any, payload: str, *, track_started: bool = True) -> dict[str, Any]:
    """The body of the payload task: run it with the shared worker entrypoint, and make
    the Celery state tell the truth, with as few result-backend writes as that needs.

    The caller reads the state only to tell a lost run from a slow one (reconciliation,
    ``PendingCheck``), to confirm a cancel, and, for keyed runs, to answer other callers
    holding the key. So a run writes:

    - STARTED (with ``track_started``) only once it outlives the short-task window
      (``runner.STARTED_AFTER``): a task still running is what a lost worker must be
      told apart from; a shorter one is over before anyone could ask;
    - SUCCESS with a summary only when someone may read it: for keyed runs (with the
      signed outcome other callers answer from), after a STARTED (which must not stay
      the last word), and when the caller did not acknowledge the outcome within
      ``sender.ACK_GRACE`` (the outbox goes on delivering it). Then the summary carries
      the signed outcome too, and is written before the task returns: the slot is free
      before the acknowledgement, so a worker killed from then on must leave the outcome
      where the caller finds it (reconciliation sees the job finished, not lost; the
      runner recorded it in the run's ledger too). A short unkeyed run whose caller took
      its result writes nothing, where native Celery writes once;
    - REVOKED when cancelled (the confirmation of a ``require_ack`` cancel);
    - FAILURE (stored by Celery, as the task raises) when the outcome could not be
      delivered nor recorded.
    """
    from celery import states
    from celery.exceptions import Ignore

    from wove_adapters.core import envelope as payload_mod
    from wove_adapters.core.errors import PayloadError
    from wove_adapters.worker import runner as worker

    if payload_mod.is_chunk(payload):
        return _execute_chunk(task, payload, track_started=track_started)
    try:
        envelope = payload_mod.decode_payload(payload)
    except PayloadError:
        worker.run(payload)  # reports the refusal to the caller where it can
        raise  # and Celery records FAILURE
    # States go through one background thread per child, in order (STARTED before the
    # final one), off the task's critical path. Keyed runs wait for their final state:
    # other callers holding the key answer from it.
    writer = _StateWriter(task)
    on_started = None
    if track_started:
        started = {"pid": os.getpid(), "hostname": task.request.hostname}

        def on_started() -> None:  # the heartbeat thread, before the run's final state
            writer.write_soon(states.STARTED, started)

    outcome = worker.run_envelope(envelope, on_started=on_started)
    summary: dict[str, Any] = {
        "state": outcome.state, "run_id": envelope.run_id, "attempt": envelope.attempt,
    }
    if outcome.state == "cancelled":
        from celery.exceptions import TaskRevokedError

        # REVOKED is one of Celery's exception states: readers decode an exception.
        writer.write_soon(states.REVOKED, TaskRevokedError(f"cancelled: {summary}"))
        raise Ignore()
    if not outcome.delivered:
        writer.flush()  # Celery stores FAILURE next: our STARTED must not land after it
        raise RuntimeError(
            f"the outcome of run {envelope.run_id} could not be delivered to its caller "
            f"({envelope.return_path.kind} {envelope.return_path.url}) nor recorded"
        )
    keyed = envelope.delivery.get("delivery_idempotency_key") is not None
    late = outcome.pending is not None  # not acknowledged within the grace
    if keyed or late:
        signed = outcome.signed()  # JSON results carry text: base64
        summary["outcome"] = base64.b64encode(signed).decode("ascii") if signed else None
    if not (keyed or outcome.started or late):
        return summary  # the caller has it, nothing says otherwise: no write at all
    done = writer.write_soon(states.SUCCESS, summary)
    if keyed:
        done.result(timeout=60)
    elif late:
        writer.flush()  # landed (or logged) before the slot is free; the outbox delivers
    return summary


def _execute_chunk(task: Any, payload: str, *, track_started: bool) -> dict[str, Any]:
    """A chunk's body (``worker.chunks``): its runs report for themselves; the Celery
    state says how the job went (one STARTED, one final state, as for a single run)."""
    from celery import states
    from celery.exceptions import Ignore, TaskRevokedError

    from wove_adapters.core.errors import PayloadError
    from wove_adapters.core.policies import RunState
    from wove_adapters.worker import chunks

    writer = _StateWriter(task)
    if track_started:
        writer.write_soon(states.STARTED, {"pid": os.getpid(),
                                           "hostname": task.request.hostname})
    done = chunks.run_chunk(payload)
    summary = done.summary()
    if done.state is RunState.REFUSED:
        writer.flush()
        raise PayloadError(f"every payload of the chunk was refused: {summary}")
    if done.state is RunState.CANCELLED:
        writer.write_soon(states.REVOKED, TaskRevokedError(f"cancelled: {summary}"))
        raise Ignore()
    if not done.delivered:
        writer.flush()
        raise RuntimeError(f"outcomes of a chunk could not be delivered nor recorded: {summary}")
    writer.write_soon(states.SUCCESS, summary)
    return summary


class _StateWriter:
    """Writes this task's state to the result backend: one ``SET`` (+ ``PUBLISH``, for
    ``.get()`` waiters) on key-value backends, Celery's ``store_result`` elsewhere.
    ``write_soon`` uses a per-process background thread, off the task's critical path."""

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _pid = 0

    def __init__(self, task: Any) -> None:
        self.backend = task.backend
        self.request = task.request
        self.task_id = task.request.id
        self.last: concurrent.futures.Future[None] | None = None

    def write(self, state: str, result: Any) -> None:
        from celery.backends.base import BaseKeyValueStoreBackend, DisabledBackend

        backend = self.backend
        if isinstance(backend, DisabledBackend):
            return
        if not isinstance(backend, BaseKeyValueStoreBackend):
            backend.store_result(self.task_id, result, state, request=self.request)
            return
        from celery import states

        if state in states.EXCEPTION_STATES and isinstance(result, BaseException):
            result = backend.prepare_exception(result)
        meta = backend._get_result_meta(result=result, state=state, traceback=None,
                                        request=self.request)
        meta["task_id"] = self.task_id
        backend.set(backend.get_key_for_task(self.task_id), backend.encode(meta))

    def write_soon(self, state: str, result: Any) -> concurrent.futures.Future[None]:
        cls = type(self)
        if cls._pool is None or cls._pid != os.getpid():  # first task of this child
            cls._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="wove-celery-state")
            cls._pid = os.getpid()
        self.last = cls._pool.submit(self._write_logged, state, result)
        return self.last

    def _write_logged(self, state: str, result: Any) -> None:
        try:
            self.write(state, result)
        except Exception as exc:  # the state is advisory; the outcome went out already
            log.warning("could not record state %s of task %s: %s", state, self.task_id, exc)
            raise

    def flush(self) -> None:
        """Wait until this task's queued writes have landed (errors are logged)."""
        if self.last is not None:
            with contextlib.suppress(Exception):  # logged by _write_logged
                self.last.result(timeout=30)


def make_worker_app(
    broker_url: str | None = None, result_backend: str | None = None, **conf: Any
) -> Any:
    """A ready Celery app with the payload task, for deployments without one:
    ``celery -A wove_adapters.adapters.celery:worker_app worker -Q QUEUE`` reads
    ``WOVE_CELERY_BROKER_URL``, ``WOVE_CELERY_RESULT_BACKEND`` and
    ``WOVE_CELERY_CONFIG`` (JSON of Celery settings)."""
    from celery import Celery

    broker = broker_url or os.environ.get("WOVE_CELERY_BROKER_URL") or DEFAULT_BROKER
    backend = result_backend or os.environ.get("WOVE_CELERY_RESULT_BACKEND")
    if backend is None and broker.startswith(("redis://", "rediss://")):
        backend = broker
    app = Celery("wove_adapters", broker=broker, backend=backend or None)
    app.conf.update(BASE_CONF)
    app.conf.update(json.loads(os.environ.get("WOVE_CELERY_CONFIG") or "{}"))
    app.conf.update(conf)
    register(app)
    return app


_worker_app: Any = None


def __getattr__(name: str) -> Any:
    """``worker_app`` is built on first access (so importing this module stays cheap);
    ``wove_adapters.adapters.celery:worker_app`` is this one."""
    global _worker_app
    if name == "worker_app":
        if _worker_app is None:
            _worker_app = make_worker_app()
        return _worker_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
