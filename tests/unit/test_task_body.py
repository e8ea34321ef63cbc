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


def test_plain_arguments_take_the_standard_pickler_and_round_trip() -> None:
    import pickle

    value = {"a": [1, 2.5, None, True], "b": (b"x", "y", frozenset({3})), 7: {1, 2}}
    body = task_body(functools.partial(_twice, value), {"k": [1, (2, 3)]})
    func, args = pickle.loads(body)  # the worker's loads is pickle's
    assert func(**args) == (value, [1, (2, 3)])


def test_arguments_that_are_not_plain_data_are_pickled_by_value() -> None:
    """A class made at run time (as in ``__main__`` or a notebook) is not importable on a
    worker: it must travel by value (cloudpickle), never by reference."""
    made = type("MadeHere", (), {"n": 5})
    instance = made()
    offset = 3
    body = task_body(functools.partial(_twice, instance), {"k": lambda x: x + offset})
    func, args = loads(body)
    got, k = func(**args)
    assert type(got).__name__ == "MadeHere" and got.n == 5 and k(1) == 4


def test_many_plain_values_stop_looking_and_still_round_trip() -> None:
    big = list(range(10_000))
    func, args = loads(task_body(functools.partial(_twice, big), {"k": None}))
    assert func(**args) == (big, None)


def _twice(value: Any, k: Any) -> tuple[Any, Any]:
    return value, k
