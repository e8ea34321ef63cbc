"""What the rq caller reads back from RQ's Redis, read so that nothing is unpickled.

RQ pickles a job's data, meta and result by default, and ``Job.fetch`` and
``return_value()`` unpickle them: anyone who can write to RQ's Redis would run code in
the caller. So the caller reads the job hash fields it needs as plain text with
``HMGET`` (status, worker, origin, and the ``wove_state`` and ``wove_outcome`` fields
``run_payload`` writes), asks Redis which workers still listen on their command channels
with ``PUBSUB NUMSUB``, and builds the ``Job`` objects RQ's cancel and delete need
without reading Redis, with a serializer that refuses to load anything. A recorded
outcome is signed and verified by the transport before anything in it is unpickled.

Importing this module never imports rq or redis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from wove_adapters.worker.rq import OUTCOME_FIELD


class CallerSerializer:
    """The caller's RQ serializer: writes what RQ's default (pickle) workers read, and
    loads nothing. The caller never needs to read a job's data, meta or result; should
    any RQ code path try, it fails instead of unpickling what a Redis writer planted."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        import pickle

        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def loads(data: bytes) -> Any:
        raise ValueError("wove-adapters' rq caller never deserializes job data from Redis")


def read_fields(
    connection: Any, handles: Sequence[str], *fields: str
) -> list[list[str | None]]:
    """The named fields of each job's hash as text (None: absent), one pipeline."""
    from rq.job import Job

    pipe = connection.pipeline(transaction=False)
    for handle in handles:
        pipe.hmget(Job.key_for(handle), *fields)
    return [[_text(value) for value in row] for row in pipe.execute()]


def caller_job(connection: Any, handle: str, origin: str) -> Any:
    """A ``Job`` to cancel or delete with, built without reading Redis (``Job.fetch``
    would unpickle the job's meta): RQ's cancel and delete need only its id, origin
    and status (read raw)."""
    from rq.job import Job

    job = Job(handle, connection=connection, serializer=CallerSerializer)
    job.origin = origin
    return job


def recorded_outcomes(connection: Any, handles: list[str]) -> dict[str, bytes | Exception]:
    """The signed outcome each finished job recorded in its hash (run_payload),
    read raw: the transport verifies it before anything in it is unpickled."""
    import base64
    import binascii

    found: dict[str, bytes | Exception] = {}
    rows = read_fields(connection, handles, "status", OUTCOME_FIELD)
    for handle, (status, blob) in zip(handles, rows, strict=True):
        if status != "finished":
            continue
        try:
            found[handle] = base64.b64decode(blob or "", validate=True) or RuntimeError(
                f"rq job {handle} holding this idempotency key finished without a "
                f"recorded outcome (a worker older than this caller?)"
            )
        except (binascii.Error, ValueError) as exc:
            found[handle] = RuntimeError(
                f"rq job {handle} holding this idempotency key recorded an unreadable "
                f"outcome ({exc}): not written by a wove-adapters worker"
            )
    return found


def subscribed(connection: Any, channels: Sequence[str]) -> set[str]:
    """The channels someone listens on, in one ``PUBSUB NUMSUB``. A live RQ worker is
    subscribed to its command channel (``rq:pubsub:<name>``), and Redis drops that
    subscription the moment the worker's connection dies, whereas RQ keeps a worker
    killed with SIGKILL registered for its worker_ttl (minutes)."""
    if not channels:
        return set()
    counts = dict(connection.pubsub_numsub(*channels))
    return {
        channel
        for channel in channels
        if int(counts.get(channel.encode(), 0) or counts.get(channel, 0)) > 0
    }


def _text(value: bytes | None) -> str | None:
    return value.decode("utf-8", "replace") if value is not None else None
