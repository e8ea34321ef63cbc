"""An adapter fills ``status`` or ``status_many``: each default calls the other, so one
that fills neither must fail when its class is defined, not recurse at the first
reconciliation tick."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from wove_adapters.adapters.base import BackendAdapter, JobSpec
from wove_adapters.core.policies import JobState


class _Submits(BackendAdapter):
    """Abstract still (no ``cancel``): no status needed yet."""

    async def submit(self, job: JobSpec) -> str:
        return job.run_id


def test_a_concrete_adapter_without_status_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="must override status or status_many"):

        class _Neither(_Submits):
            async def cancel(self, handle: str, *, running: bool = True) -> None:
                return None


def test_status_alone_serves_status_many() -> None:
    class _One(_Submits):
        async def cancel(self, handle: str, *, running: bool = True) -> None:
            return None

        async def status(self, handle: str) -> JobState:
            return JobState.RUNNING if handle == "a" else JobState.GONE

    states = asyncio.run(_One({}, environment="t").status_many(["a", "b"]))
    assert states == {"a": JobState.RUNNING, "b": JobState.GONE}


def test_status_many_alone_serves_status() -> None:
    class _Many(_Submits):
        async def cancel(self, handle: str, *, running: bool = True) -> None:
            return None

        async def status_many(self, handles: Sequence[str]) -> dict[str, JobState]:
            return {h: JobState.SUCCEEDED for h in handles if h != "unknowable"}

    adapter = _Many({}, environment="t")
    assert asyncio.run(adapter.status("a")) is JobState.SUCCEEDED
    assert asyncio.run(adapter.status("unknowable")) is JobState.UNKNOWN
