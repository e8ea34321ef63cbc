"""A mapped call's callable is pickled once, not once per run, and never stale."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from wove_adapters.core.envelope import loads, task_body

PICKLED = {"count": 0}


class Counted:
    """A callable that counts how often it is pickled."""

    def __call__(self, x: int) -> int:
        return x * 10

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        PICKLED["count"] += 1
        return Counted, ()


def test_one_pickle_per_loop_iteration_for_a_mapped_call() -> None:
    task = Counted()

    async def submit_twice() -> list[Any]:
        bodies = [task_body(functools.partial(task, i), {}) for i in range(100)]
        first = PICKLED["count"]
        await asyncio.sleep(0)  # the next iteration pickles afresh
        task_body(functools.partial(task, 0), {})
        return [first, PICKLED["count"], bodies]

    PICKLED["count"] = 0
    first, second, bodies = asyncio.run(submit_twice())
    assert first == 1 and second == 2
    func, args = loads(bodies[7])
    assert func(**args) == 70


def test_a_closure_pickled_later_carries_its_values_then() -> None:
    async def scenario() -> tuple[int, int]:
        offset = 1

        def add(x: int) -> int:
            return x + offset

        before = task_body(functools.partial(add, 1), {})
        await asyncio.sleep(0)
        offset = 100
        after = task_body(functools.partial(add, 1), {})
        f1, a1 = loads(before)
        f2, a2 = loads(after)
        return f1(**a1), f2(**a2)

    assert asyncio.run(scenario()) == (2, 101)


def test_plain_callables_and_keywords_round_trip() -> None:
    func, args = loads(task_body(lambda x, y=2: x * y, {"x": 4, "y": 5}))
    assert func(**args) == 20
