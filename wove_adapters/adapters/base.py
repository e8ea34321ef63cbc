"""The adapter contract: what one job system has to fill in.

An adapter fills three primitives for its job system (``submit``, ``cancel``, ``status``),
declares ``Capabilities`` honestly, and maps its native states into ``JobState``. All the
shared machinery (signed payloads, the payload store, the callback receiver, the ledger,
reconciliation, following another caller's job that holds the same idempotency key) lives
in ``adapters.transport.AdapterTransport``, so an adapter fits in a screenful or three.

Which class a name means is the registry's job (``adapters/registry.py``).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from wove_adapters.core.options import AdapterOptions
from wove_adapters.core.policies import Capabilities, JobState
from wove_adapters.core.transport import Emit, gather_statuses


@dataclass
class JobSpec:
    """What an adapter submits: the signed payload text plus naming hints."""

    run_id: str
    task_id: str
    attempt: int
    payload: str  # "wove1.…" - verify-before-unpickle, safe in env vars (if small)
    idempotency_key: str | None
    job_name: str  # a readable, backend-safe default name
    environment: str
    delivery: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # per-task pass-through


class Following(str):
    """What ``submit`` returns when another caller's job already holds the run's
    idempotency key (the backend's own dedupe said so, or a shared claim did): the handle
    of that job. The transport then follows it (``outcomes``), answers cancel and detach
    for this run itself, and never cancels the other caller's job."""

    __slots__ = ()


_Adapter = TypeVar("_Adapter", bound="BackendAdapter")


class BackendAdapter(abc.ABC):
    """The per-backend piece. Promises:

    - ``start``: connect (clients are shared per process and configuration); raise a clear
      error if the backend is unreachable.
    - ``submit``: hand the payload to the backend without blocking the loop; return the
      backend's handle. With ``capabilities.native_idempotency`` the same
      ``idempotency_key`` must yield one backend job.
    - ``cancel``: ask the backend to stop the job (queued and, where declared, running).
    - ``status``: the backend's view, mapped with ``STATE_MAP`` (UNKNOWN fallback).
    - ``status_many``: the same for many handles at once. The transport asks it once per
      reconciliation tick (and once per confirmation round) for every job it wonders
      about; an adapter whose backend answers many jobs in one request overrides it,
      and keeps no status cache of its own.

      Each default is written in terms of the other, so an adapter fills one of the two
      (``status_many`` where the backend answers many jobs in one request); a concrete
      adapter that fills neither is a TypeError when its class is defined, not an
      endless recursion at the first reconciliation tick.
    - ``outcomes``: for adapters whose ``submit`` may return ``Following``: the signed
      outcome each finished job recorded in the backend (the worker's terminal event,
      ``worker.runner.Outcome.signed``), read many at once; the transport verifies it and
      hands it to every run that follows the job.
    - ``aclose``: release clients.

    ``async with adapter:`` starts it and closes it (scripts and tests; the transport
    calls ``start`` and ``aclose`` itself).
    """

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    required_modules: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities(status=True)
    STATE_MAP: ClassVar[dict[str, JobState]] = {}
    # Every executor_config key the adapter reads (an AdapterOptions subclass, declared
    # at the top of its module); unknown keys then fail at start-up. None: not declared
    # (a third-party adapter), nothing is checked.
    config_struct: ClassVar[type[AdapterOptions] | None] = None
    # How long a run may stay silent before its job's status is checked.
    reconcile_seconds: ClassVar[float] = 2.0
    # How often require_ack cancels waiting for the backend's confirmation are polled
    # (one status_many for all of them): slower for backends where one round is a LIST,
    # a paid API call or a subprocess.
    confirm_poll_seconds: ClassVar[float] = 0.1
    # What the process that ran a job does with an outcome the caller did not take yet,
    # once the backend reports the job finished (see AdapterTransport.status):
    # "retries": it lives on (a worker pool) and its outbox keeps trying for
    #   worker_retry_seconds, having recorded the outcome in the ledger;
    # "settled": it exits with the job (a work-horse) once the outcome is delivered or
    #   recorded, after up to worker_exit_flush_seconds of retries for a caller that may
    #   be alive;
    # "flushed": it exits (``python -m wove_adapters.worker``) only after those retries,
    #   so the ledger is the only place left to look.
    after_job: ClassVar[str] = "retries"

    # ``executor_config`` parsed into ``config_struct`` (defaults and coercions in one
    # place); an adapter narrows the type (``options: ArqOptions``) and reads its keys
    # here. ``config`` stays the raw mapping, for per-task options (``options_for``).
    options: AdapterOptions

    def __init__(self, config: dict[str, Any], *, environment: str) -> None:
        self.config = config
        self.options = (self.config_struct or AdapterOptions).of(config)
        self.environment = environment
        self.emit: Emit | None = None

    @functools.cached_property
    def native(self) -> bool:
        """The backend hands each run's outcome back itself (``return_path: native`` on
        an adapter that offers it): the transport opens no receiver, and the adapter
        reports every run's end (``report``)."""
        return self.capabilities.native_result and self.options.return_path == "native"

    def report(self, frame: dict[str, Any] | None) -> None:
        """Hand a run's event to the transport, for an adapter that reports its runs' ends
        itself (a future or a workflow result as the way back). Nothing for None, or when
        no transport listens (a bare adapter in a script or a test)."""
        if frame is not None and self.emit is not None:
            self.emit(frame)

    async def start(self) -> None:
        """Connect; default: nothing to do."""

    @abc.abstractmethod
    async def submit(self, job: JobSpec) -> str: ...

    @abc.abstractmethod
    async def cancel(self, handle: str, *, running: bool = True) -> None: ...

    async def status(self, handle: str) -> JobState:
        """Default: ``status_many`` of this one handle (UNKNOWN when it was left out)."""
        return (await self.status_many([handle])).get(handle, JobState.UNKNOWN)

    async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
        """``{handle: state}``; a handle left out could not be told this time (never a
        verdict). Default: ``status`` of each, a bounded number at a time."""
        return await gather_statuses(self.status, {handle: handle for handle in handles})

    async def waiting_reasons(self, handles: Sequence[str]) -> dict[str, str]:
        """``{handle: why it has not started}`` in the backend's words, for messages
        only (``Transport.waiting_reasons``). Default: nothing to add."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        abstract = any(getattr(getattr(cls, name, None), "__isabstractmethod__", False)
                       for name in ("submit", "cancel"))
        if (not abstract and cls.status is BackendAdapter.status
                and cls.status_many is BackendAdapter.status_many):
            raise TypeError(
                f"{cls.__qualname__} must override status or status_many (each default "
                f"calls the other)"
            )

    async def outcomes(self, handles: Sequence[str]) -> dict[str, bytes | Exception]:
        """``{handle: signed outcome}`` for the followed jobs that finished with one;
        an ``Exception`` instead when a job finished in a way that will never yield one
        (it becomes the following run's error). Jobs not finished yet are left out; a
        job that died is found by reconciliation (``status_many``). Reconciliation also
        asks it for a run's own job that finished without its terminal event (the
        worker records the outcome there when its caller did not answer in time).
        Default: nothing (an adapter that never returns ``Following``)."""
        return {}

    async def detach(self, handle: str) -> None:
        """Leave the job running without us (default: nothing to let go of)."""

    async def submit_many(self, jobs: list[JobSpec]) -> list[str]:
        """Submit several jobs at once (``capabilities.array_jobs``: one array job).
        Returns one handle per job, in order. Default: one by one."""
        return [await self.submit(job) for job in jobs]

    async def release(self, handle: str) -> None:
        """The run ended: remove per-job files or records (default: nothing)."""

    async def drain(self) -> None:
        """Shutdown, after orphan policies and before the dispatcher's last ledger write:
        let work that must end with this process end (default: nothing to wait for)."""

    async def aclose(self) -> None:
        """Release clients; default: nothing."""

    async def __aenter__(self: _Adapter) -> _Adapter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def doctor(self) -> list[tuple[str, bool, str]]:
        """Checks for ``wove-adapters doctor``: (what, ok, detail) rows, e.g. broker
        reachable, a worker listening on the queue. Each failing row says what to do.
        The return path's rows (receiver, drop box) are the transport's, for every adapter."""
        return []

    async def worker_hosts(self) -> list[str] | None:
        """The hosts of the workers that take this environment's jobs, where the backend
        can say (``doctor`` flags a loopback receiver that workers elsewhere cannot
        reach); None where it cannot."""
        return None

    @classmethod
    def map_state(cls, native: object) -> JobState:
        from wove_adapters.core.policies import map_state

        return map_state(cls.STATE_MAP, native)

    def options_for(self, job: JobSpec) -> dict[str, Any]:
        """``executor_config`` with the run's per-task options (``task_options``) on top."""
        return {**self.config, **job.options}

    @staticmethod
    def safe_name(text: str, *, allowed: str = r"A-Za-z0-9_\-", max_len: int = 128) -> str:
        """A backend-safe name from any key: disallowed characters become ``-``; a long
        name keeps a digest of the whole so distinct keys stay distinct."""
        cleaned = re.sub(f"[^{allowed}]", "-", text)
        return digested(text, cleaned, max_len=max_len, digits=12, trim="")


def digested(text: str, cleaned: str, *, max_len: int, digits: int = 10, trim: str = "-") -> str:
    """A name a backend accepts: ``text`` itself when cleaning (to the backend's
    characters) left it alone and it fits ``max_len``; otherwise the cleaned text, cut to
    fit beside a digest of the original (``digits`` hex digits), so distinct texts keep
    distinct names. Names already handed out depend on ``digits`` and ``trim``: they stay
    as each caller has them."""
    if cleaned == text and len(text) <= max_len:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:digits]
    head = cleaned[: max(max_len - digits - 1, 0)].rstrip(trim)
    return f"{head}-{digest}" if head else digest
