"""The executor registry: one alphabetized, read-only view, entry points read lazily."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wove_adapters.adapters import registry
from wove_adapters.adapters.transport import AdapterTransport
from wove_adapters.core.executors.local import LocalTransport
from wove_adapters.core.executors.stdio import StdioTransport


@pytest.fixture
def fresh_entry_points() -> Iterator[None]:
    registry.refresh_entry_points()
    yield
    registry.refresh_entry_points()


def test_every_executor_is_in_one_alphabetized_view() -> None:
    names = list(registry.EXECUTORS)
    assert names == sorted(names)
    assert {"local", "stdio", *registry._BUILTINS} <= set(names)
    assert registry.executor_names() == names
    assert "local" not in registry.adapter_names() and "celery" in registry.adapter_names()
    assert registry.EXECUTORS["celery"].extra == "celery"
    assert registry.EXECUTORS["local"].target == (
        "wove_adapters.core.executors.local:LocalTransport"
    )


def test_the_view_is_read_only() -> None:
    with pytest.raises(TypeError):
        registry.EXECUTORS["x"] = registry.Where("m:C", "")  # type: ignore[index]
    with pytest.raises(TypeError):
        registry._BUILTINS["x"] = registry.Where("m:C", "")  # type: ignore[index]


def test_entry_points_join_only_when_a_name_is_not_found_elsewhere(
    fresh_entry_points: None,
) -> None:
    assert "celery" in registry.EXECUTORS and "local" in registry.EXECUTORS
    assert registry._entry_points is None, "a built-in lookup read the entry points"
    assert "surely-not-an-executor" not in registry.EXECUTORS
    assert registry._entry_points is not None


def test_names_build_their_transports() -> None:
    assert isinstance(registry.transport_for("local"), LocalTransport)
    assert isinstance(registry.transport_for("stdio"), StdioTransport)
    assert isinstance(registry.transport_for("process"), AdapterTransport)


def test_unknown_names_list_every_executor_and_suggest_the_closest() -> None:
    with pytest.raises(ValueError) as info:
        registry.transport_for("stdoi")
    message = str(info.value)
    assert "Did you mean 'stdio'?" in message
    assert f"Known executors: {', '.join(registry.executor_names())} " in message
    assert "'wove_adapters.adapters' entry-point group" in message


def test_core_executors_are_not_adapter_classes() -> None:
    with pytest.raises(ValueError, match="built into wove_adapters.core"):
        registry.get_adapter_class("local")
