"""Task controls kept through the ledger, so they hold across every caller that shares it.

The dispatcher asks this module three things about a run whose task has controls
(``policies.TaskControls``, docs/task-controls.md):

- ``admit``: should this call attach to a run already registered (``registration_concurrency``)
  or already holding the concurrency slot (``reroute_on_concurrency_control``)?
- ``take_slot``: wait for the run's concurrency slot (``concurrency_control``) before the
  job is launched; ``release`` gives it back once the job is known to have stopped.
- ``cache_key``: the idempotency key under which a succeeded run answers later calls with
  the same cache arguments (``cache_results``); the ledger's own key claim does the rest.

Slots and registrations are ledger leases renewed while their run lives: a caller that dies
stops renewing, and its slot is free again within ``concurrency_lease_seconds``. Within one
process, runs waiting for one slot queue in order and the first in line is handed the slot
at once when it is released; across processes the first in line of each polls the ledger.

Names are ``{app_id}|{kind}|{task}|{mode}|{digest}``: the digest is over the canonical
JSON of the arguments that identify a run for the mode (all of them, or
``key_arguments``), with ``repr`` for values JSON cannot hold.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from wove_adapters.core.errors import ArgumentsConflictError
from wove_adapters.core.ledger import Ledger
from wove_adapters.core.policies import TaskControls

log = logging.getLogger("wove_adapters.controls")
# How long the argument set behind a cache entry is kept when entries never expire.
CACHE_ARGS_SECONDS = 30 * 24 * 3600.0
# The first waiter of a slot asks the ledger at most this often (seconds), backing off
# from POLL_FIRST: a slot freed in another process is taken within about this long.
POLL_FIRST, POLL_MAX = 0.01, 0.05
SHOWN_CHARS = 200


def canonical(values: Mapping[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=repr, separators=(",", ":"))


def digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(values).encode()).hexdigest()[:32]


def shown(values: Mapping[str, Any]) -> str:
    text = ", ".join(f"{name}={value!r}" for name, value in sorted(values.items()))
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True)
class Holder:
    """What a lease holds: the run, and the argument set it was called with."""

    run_id: str
    digest: str
    shown: str

    @classmethod
    def of(cls, run_id: str, args: Mapping[str, Any]) -> Holder:
        return cls(run_id, digest(args), shown(args))

    def encode(self) -> str:
        return json.dumps([self.run_id, self.digest, self.shown], separators=(",", ":"))

    @classmethod
    def decode(cls, value: str | None) -> Holder | None:
        if not value:
            return None
        try:
            run_id, found, text = json.loads(value)
        except (ValueError, TypeError):
            return None  # not ours (or damaged): nobody to attach to
        return cls(str(run_id), str(found), str(text))


class Controls:
    """One dispatcher's view of the ledger's leases."""

    def __init__(self, ledger: Ledger, *, app_id: str | None = None) -> None:
        self.ledger = ledger
        self.prefix = f"{app_id}|" if app_id else ""
        # name -> (value, lease seconds) for every lease this process holds.
        self.held: dict[str, tuple[str, float]] = {}
        self._by_run: dict[str, list[str]] = collections.defaultdict(list)
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._renewer: asyncio.Task[None] | None = None
        self._dropping: set[asyncio.Task[None]] = set()
        self.stats = {"slot_waits": 0, "registration_attached": 0, "rerouted": 0}

    # ------------------------------------------------------------------ names

    def _scope(self, kind: str, mode: str, task_id: str, args: Mapping[str, Any],
               controls: TaskControls) -> str:
        if mode == "task":
            part = "-"
        elif mode == "arguments":
            part = digest(args)
        else:
            missing = [name for name in controls.key_arguments if name not in args]
            if missing:
                raise ValueError(
                    f"task '{task_id}': key_arguments {missing} are not arguments of this "
                    f"call (it has {sorted(args)}); fix key_arguments"
                )
            part = digest({name: args[name] for name in controls.key_arguments})
        return f"{self.prefix}{kind}|{task_id}|{mode}|{part}"

    def cache_key(self, task_id: str, args: Mapping[str, Any], controls: TaskControls) -> str:
        """Entries of one ``cache_ttl_seconds`` window share a key, so an entry answers for
        at most that long (one made late in a window ends with it)."""
        cached = {k: v for k, v in args.items() if k not in controls.cache_ignore}
        window = f"|w{int(time.time() // controls.cache_ttl)}" if controls.cache_ttl else ""
        return f"{self.prefix}cache|{task_id}|{digest(cached)}{window}"

    def app_key(self, key: str) -> str:
        """An idempotency key in this application's namespace."""
        return f"{self.prefix}{key}" if self.prefix and not key.startswith(self.prefix) else key

    # --------------------------------------------------------------- admission

    async def admit(self, run_id: str, task_id: str, args: Mapping[str, Any],
                    controls: TaskControls) -> Holder | None:
        """The run this call should attach to, or None to run it. Raises
        ``ArgumentsConflictError`` (``on_diff_non_key_args_raise``) when the run found
        matches by key arguments but not by the others."""
        me = Holder.of(run_id, args)
        if controls.registration != "unlimited":
            name = self._scope("reg", controls.registration, task_id, args, controls)
            other = await self.ledger.lease(name, me.encode(), controls.lease_seconds)
            if other is None:
                self._hold(run_id, name, me.encode(), controls.lease_seconds)
            elif (holder := Holder.decode(other)) is not None and holder.run_id != run_id:
                self.check_same_arguments(controls, task_id, me, holder)
                self.stats["registration_attached"] += 1
                return holder
        if controls.concurrency != "unlimited" and controls.reroute:
            name = self._scope("slot", controls.concurrency, task_id, args, controls)
            holder = Holder.decode(await self.ledger.lease_holder(name))
            if holder is not None and holder.run_id != run_id:
                self.check_same_arguments(controls, task_id, me, holder)
                self.stats["rerouted"] += 1
                self.release(run_id)  # the registration taken above is not needed
                return holder
        return None

    @staticmethod
    def check_same_arguments(
        controls: TaskControls, task_id: str, me: Holder, other: Holder
    ) -> None:
        if controls.raise_on_diff and me.digest != other.digest:
            raise ArgumentsConflictError(
                f"task '{task_id}': this call ({me.shown}) matches run {other.run_id} "
                f"({other.shown}) by its key arguments but differs in the others, so that "
                f"run's result would not be this call's (on_diff_non_key_args_raise). Make "
                f"the differing arguments key arguments, or turn the setting off.",
                run_id=other.run_id, this=me.shown, other=other.shown,
            )

    async def remember_arguments(self, key: str, run_id: str, args: Mapping[str, Any],
                                 controls: TaskControls) -> None:
        """The argument set behind a cache entry, for ``on_diff_non_key_args_raise``."""
        value = Holder.of(run_id, args).encode()
        with contextlib.suppress(Exception):
            await self.ledger.lease(f"{key}|args", value, controls.cache_ttl or CACHE_ARGS_SECONDS)

    async def check_cached(self, key: str, owner: str, run_id: str, task_id: str,
                           args: Mapping[str, Any], controls: TaskControls) -> None:
        """``on_diff_non_key_args_raise`` for a call that found ``owner`` holding its
        cache key: the argument set behind that entry must be this call's."""
        other = None
        with contextlib.suppress(Exception):
            other = Holder.decode(await self.ledger.lease_holder(f"{key}|args"))
        if other is not None and other.run_id == owner:
            me = Holder.of(run_id, args)
            self.check_same_arguments(controls, task_id, me, other)

    # ------------------------------------------------------------------- slots

    async def take_slot(self, run_id: str, task_id: str, args: Mapping[str, Any],
                        controls: TaskControls, done: Callable[[], bool]) -> bool:
        """Wait for the run's slot; False if the run ended (cancelled, timed out) first."""
        name = self._scope("slot", controls.concurrency, task_id, args, controls)
        value = Holder.of(run_id, args).encode()
        queue = self._waiting.setdefault(name, collections.deque())
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(turn)
        if queue[0] is turn:
            turn.set_result(None)
        try:
            while not turn.done():  # wait to be first in line here
                await asyncio.wait([turn], timeout=0.2)
                if done():
                    return False
            delay, waited = POLL_FIRST, False
            while not done():
                other = await self.ledger.lease(name, value, controls.lease_seconds)
                if other is None:
                    self._hold(run_id, name, value, controls.lease_seconds)
                    return True
                if not waited:
                    waited = True
                    self.stats["slot_waits"] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, POLL_MAX)
            return False
        finally:
            queue.remove(turn)
            if queue:
                if not queue[0].done():
                    queue[0].set_result(None)
            else:
                self._waiting.pop(name, None)

    def _hold(self, run_id: str, name: str, value: str, seconds: float) -> None:
        self.held[name] = (value, seconds)
        self._by_run[run_id].append(name)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def release(self, run_id: str) -> None:
        """Give back every lease ``run_id`` holds (its job has stopped)."""
        names = self._by_run.pop(run_id, [])
        for name in names:
            value, _ = self.held.pop(name, ("", 0.0))
            task = asyncio.get_running_loop().create_task(self._drop(name, value))
            self._dropping.add(task)  # keep it alive until it ran
            task.add_done_callback(self._dropping.discard)

    async def _drop(self, name: str, value: str) -> None:
        try:
            await self.ledger.drop_lease(name, value)
        except Exception as exc:  # it expires with its lease anyway
            log.warning("could not release %s in the ledger (%s); it frees itself when "
                        "its lease runs out", name, exc)

    async def _renew(self) -> None:
        """Renew every held lease at a third of its length, until none is held."""
        while self.held:
            shortest = min(seconds for _, seconds in self.held.values())
            await asyncio.sleep(max(0.05, shortest / 3))
            by_length: dict[float, dict[str, str]] = collections.defaultdict(dict)
            for name, (value, seconds) in list(self.held.items()):
                by_length[seconds][name] = value
            for seconds, held in by_length.items():
                try:
                    await self.ledger.renew_leases(held, seconds)
                except Exception as exc:
                    log.warning("could not renew %d task-control leases (%s)", len(held), exc)

    async def aclose(self) -> None:
        for run_id in list(self._by_run):
            self.release(run_id)
        if self._dropping:
            await asyncio.wait(set(self._dropping), timeout=5.0)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(BaseException):
                await self._renewer
