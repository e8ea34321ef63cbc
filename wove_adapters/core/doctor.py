"""``doctor`` rows: what a check found, said so that a failure names what to do.

Every executor's ``doctor`` (and ``wove-adapters doctor``) returns rows of one shape; the
checks every adapter shares (a probe that may fail, the payload store) are written once
here. No backend library is imported: a row that needs one is its adapter's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from wove_adapters.core import stores
from wove_adapters.core.errors import redact_url

Row = tuple[str, bool, str]  # a doctor row: what, ok, detail (what to do when not ok)
T = TypeVar("T")


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
    url = url or stores.default_store_url()
    where = redact_url(url)
    s3 = " (S3 bucket)" if url.startswith("s3:") else ""
    return await checked_row(
        f"payload store reachable{s3}", asyncio.to_thread(stores.probe, url),
        f"{where} (write, read, delete; {readers})",
        lambda exc: f"{where}: {exc}; the caller writes payloads here and {readers}")
