"""What the arq caller reads back from ARQ's Redis, read so that nothing is deserialized.

ARQ pickles job data and results by default (anyone who can write to its Redis would run
code in a caller that loads them), so the caller never does: a job's ARQ status comes
from which of ARQ's keys exist (what ``Job.status()`` tells from the same keys), and what
a complete job ended with, and a keyed run's signed outcome, from the msgpack record
``wove_adapters_run`` writes (``worker.arq.RESULT_KEY``); the caller's pool refuses to
deserialize anything (``never_deserialize``). The lease a worker holds while it really
runs a job (``worker.leases``) is read in the same transaction.

Importing this module never imports arq.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from wove_adapters.worker.arq import CANCEL_KEY, LEASE_KEY, RESULT_KEY, read_record

# {job id: (ARQ's status, what the job ended with, the lease's PTTL)}
JobReads = dict[str, tuple[str, Any, int]]


def never_deserialize(data: bytes) -> Any:
    """The caller pool's ``job_deserializer``: ARQ's job data and results are pickled by
    default, and the caller reads neither (see the module docstring)."""
    raise ValueError("wove-adapters' arq caller never deserializes ARQ job data or results")


async def read_jobs(
    pool: Any, handles: Sequence[str], queues: Mapping[str, str], default_queue: str
) -> JobReads:
    """``{job id: (ARQ's status, what it ended with, the lease's PTTL)}`` for every job in
    one transaction, each job looked for on its queue in ``queues`` (else
    ``default_queue``). A complete job ended with the record ``wove_adapters_run`` wrote
    (a dict; an Exception if it is not msgpack), or, with none, ``cancelled`` (our cancel
    marker is set) or ``failed``."""
    from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix

    async with pool.pipeline(transaction=True) as pipe:
        for handle in handles:
            pipe.exists(result_key_prefix + handle)
            pipe.exists(in_progress_key_prefix + handle)
            pipe.zscore(queues.get(handle, default_queue), handle)
            pipe.exists(job_key_prefix + handle)
            pipe.pttl(LEASE_KEY + handle)
            pipe.get(RESULT_KEY + handle)
            pipe.exists(CANCEL_KEY + handle)
        replies = await pipe.execute()
    found: JobReads = {}
    for i, handle in enumerate(handles):
        done, in_progress, score, enqueued, pttl, raw, cancelled = replies[7 * i : 7 * i + 7]
        info: Any = None
        if done:
            try:
                info = read_record(raw) if raw else {
                    "state": "cancelled" if cancelled else "failed"}
            except Exception as exc:
                info = ValueError(f"the arq job {handle}'s record is not ours ({exc})")
        found[handle] = (native_status(bool(done), in_progress, score, enqueued), info, int(pttl))
    return found


def native_status(complete: bool, in_progress: bool, score: float | None, enqueued: bool) -> str:
    """ARQ's job status as ``Job.status()`` tells it from the same keys, except that a job
    whose key exists under a queue we do not know counts as queued, not not_found."""
    if complete:
        return "complete"
    if in_progress:
        return "in_progress"
    if score:
        return "deferred" if score > time.time() * 1000 else "queued"
    return "queued" if enqueued else "not_found"


def succeeded(raw: bytes | None) -> bool:
    """Our record (raw bytes, as read) says the job succeeded."""
    try:
        return raw is not None and read_record(raw).get("state") == "succeeded"
    except Exception:
        return False
