"""What the runs page shows, as plain data: the query a request asks for, a run as JSON,
a run's verified outcome, and the Prometheus text derived from the ledger.

Nothing here unpickles: a stored outcome is verified (signature, run binding) and its
event read as msgpack (``codec.verified_outcome``), so the page shows an error's kind,
message and remote traceback without ever loading a value or an exception object. An
outcome that does not verify is shown as "unverifiable", with why.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from wove_adapters.core import frames
from wove_adapters.core.codec import verified_outcome
from wove_adapters.core.ledger import STATES, TERMINAL_STATES, RunRecord

DEFAULT_LIMIT: Final = 50
MAX_LIMIT: Final = 500
METRICS_EXTRA_HINT: Final = (
    "/metrics needs prometheus-client: pip install 'wove-adapters[metrics]'"
)


class QueryError(ValueError):
    """A request parameter is wrong; the message names it and the accepted form."""


@dataclass(frozen=True)
class RunQuery:
    """The filters of ``/api/runs`` and ``/api/events``, checked."""

    environment: str | None = None
    task_id: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = DEFAULT_LIMIT
    # The cursor: the created_at of the last run already shown and the ids shown at it.
    before: float | None = None
    seen: frozenset[str] = field(default_factory=frozenset)

    def ledger_filters(self) -> dict[str, Any]:
        until = self.until if self.before is None else min(
            self.before, self.until if self.until is not None else self.before
        )
        return {"environment": self.environment, "task_id": self.task_id,
                "state": self.state, "since": self.since, "until": until}


def parse_time(name: str, text: str) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC when it names no zone)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise QueryError(
            f"{name}={text!r} is not a time: give seconds since the epoch (1733300000) or "
            f"ISO 8601 (2026-12-04T20:00:00, UTC unless it names a zone)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def parse_query(params: Mapping[str, str]) -> RunQuery:
    """``/api/runs``'s query string -> RunQuery; QueryError names a bad parameter."""
    known = {"environment", "task", "state", "since", "until", "limit", "cursor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise QueryError(f"unknown parameter(s) {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(known))})")
    state = params.get("state") or None
    if state is not None and state not in STATES:
        raise QueryError(f"state={state!r} is not a run state (one of {', '.join(STATES)})")
    text = params.get("limit") or str(DEFAULT_LIMIT)
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise QueryError(f"limit={text!r} must be a whole number from 1 to {MAX_LIMIT}")
    since = params.get("since") or None
    until = params.get("until") or None
    before, seen = decode_cursor(params["cursor"]) if params.get("cursor") else (None, [])
    return RunQuery(
        environment=params.get("environment") or None,
        task_id=params.get("task") or None,
        state=state,
        since=None if since is None else parse_time("since", since),
        until=None if until is None else parse_time("until", until),
        limit=int(text),
        before=before,
        seen=frozenset(seen),
    )


def encode_cursor(page: list[RunRecord], query: RunQuery) -> str:
    """Where the next page starts: the last run's created_at, and every id shown at that
    instant (the ledger's ``until`` is inclusive, so runs sharing it are not skipped)."""
    last = page[-1].created_at
    seen = [r.run_id for r in page if r.created_at == last]
    if query.before == last:
        seen += sorted(query.seen)
    raw = json.dumps([last, seen]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[float, list[str]]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        before, seen = json.loads(raw)
        if not isinstance(before, (int, float)) or not all(isinstance(s, str) for s in seen):
            raise TypeError
        return float(before), list(seen)
    except (binascii.Error, ValueError, TypeError):
        raise QueryError(
            "cursor is not one this server gave out: pass next_cursor from the previous "
            "page unchanged"
        ) from None


def run_json(record: RunRecord, cancel_note: str | None) -> dict[str, Any]:
    """One row of the list. ``cancel_note`` is None when the page may offer cancel, else
    why it cannot (shown as the disabled button's tooltip)."""
    ended = record.state in TERMINAL_STATES
    return {
        "run_id": record.run_id,
        "environment": record.environment,
        "task_id": record.task_id,
        "executor": record.adapter,
        "idempotency_key": record.idempotency_key,
        "attempt": record.attempt,
        "state": record.state,
        "submission": record.submission,
        "has_outcome": record.outcome is not None,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "duration": (record.updated_at - record.created_at) if ended else None,
        "cancellable": cancel_note is None,
        "cancel_note": cancel_note,
    }


def outcome_json(record: RunRecord, key_id: str) -> dict[str, Any]:
    """The run's stored terminal event, verified, for the detail view. Blocking (a key
    file may be read): call it in a thread."""
    if record.outcome is None:
        if record.state in TERMINAL_STATES:
            note = (f"the run ended {record.state}; its event was not kept (a plain "
                    f"success keeps none unless it has an idempotency key or detaches)")
        else:
            note = "no outcome yet"
        return {"status": "none", "note": note}
    try:
        event = verified_outcome(record.outcome, record.run_id, key_id=key_id)
    except Exception as exc:  # any failure to verify is what the page says, not a 500
        return {
            "status": "unverifiable",
            "note": f"{type(exc).__name__}: {exc}. Nothing in it was read. A bad signature "
                    f"means this server does not hold the environment's secret (set "
                    f"WOVE_ADAPTERS_SECRET or the environment's executor_config.secret).",
        }
    shown: dict[str, Any] = {"status": "verified", "attempt": event.attempt}
    if isinstance(event, frames.TaskError):
        shown["type"] = "error"
        shown["error"] = event.error.to_dict()
    elif isinstance(event, frames.TaskCancelled):
        shown["type"] = "cancelled"
        shown["reason"] = event.reason
    else:
        shown["type"] = "result"
        shown["elapsed"] = event.elapsed
        shown["note"] = ("the value is not shown here (reading it would unpickle it): "
                         f"wove-adapters result {record.run_id}")
    return shown


def detail_json(
    record: RunRecord, cancel_note: str | None, outcome: dict[str, Any]
) -> dict[str, Any]:
    """A run's detail: its row, where it ran, its timings and its outcome."""
    shown = run_json(record, cancel_note)
    shown["where"] = {
        "environment": record.environment,
        "executor": record.adapter,
        "backend_handle": record.submission,
    }
    shown["timings"] = {
        "submitted_at": record.created_at,
        "last_change_at": record.updated_at,
        "submit_to_end": shown["duration"],
        "ran_on_worker": outcome.get("elapsed"),
    }
    shown["outcome"] = outcome
    return shown


def metrics_text(counts: Mapping[tuple[str, str, str], int]) -> tuple[bytes, str]:
    """The Prometheus exposition of the ledger's counts, and its content type. Every
    state is written for each (environment, executor) seen, zeros included, so a series
    drops to 0 instead of vanishing when its last run moves on. Raises ImportError
    (naming the extra) without prometheus-client."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import GaugeMetricFamily
    except ModuleNotFoundError as exc:
        raise ImportError(METRICS_EXTRA_HINT) from exc

    pairs = sorted({(env, executor) for env, executor, _ in counts})

    class _LedgerCounts:
        def collect(self) -> Any:
            family = GaugeMetricFamily(
                "wove_ledger_runs",
                "Runs recorded in the ledger, by environment, executor and state.",
                labels=["environment", "executor", "state"],
            )
            for env, executor in pairs:
                for state in STATES:
                    family.add_metric([env, executor, state],
                                      counts.get((env, executor, state), 0))
            yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LedgerCounts())
    return generate_latest(registry), CONTENT_TYPE_LATEST


def summary_json(counts: Mapping[tuple[str, str, str], int]) -> dict[str, Any]:
    """What the filter bar offers and its totals: environments, executors, runs by state."""
    by_state = dict.fromkeys(STATES, 0)
    for (_, _, state), n in counts.items():
        by_state[state] = by_state.get(state, 0) + n
    return {
        "environments": sorted({env for env, _, _ in counts}),
        "executors": sorted({executor for _, executor, _ in counts}),
        "states": list(STATES),
        "by_state": by_state,
    }
