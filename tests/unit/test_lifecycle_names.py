"""One lifecycle vocabulary: adapters and transports ``start`` and ``aclose``. A second
name (``open``/``close``/``stop``) would be a method nobody calls, silently leaking what
it was meant to release, so the names are checked here rather than trusted."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

from wove_adapters.adapters.process import ProcessAdapter

PACKAGE = Path(__file__).resolve().parents[2] / "wove_adapters"
SOURCES = [
    *sorted((PACKAGE / "adapters").glob("*.py")),
    PACKAGE / "core" / "transport.py",
    *sorted((PACKAGE / "core" / "executors").glob("*.py")),
    PACKAGE / "integration" / "foreign.py",
]
BASES = {"BackendAdapter", "Transport", "abc.ABC"}
OTHER_NAMES = {"open", "close", "stop"}


def _lifecycle_classes() -> list[tuple[str, ast.ClassDef]]:
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {ast.unparse(base) for base in node.bases}
            if bases & BASES or any(b.endswith(("Adapter", "Transport")) for b in bases):
                found.append((f"{path.relative_to(PACKAGE.parent)}:{node.name}", node))
    return found


def test_adapters_and_transports_use_start_and_aclose() -> None:
    classes = _lifecycle_classes()
    assert len(classes) >= 15  # the base classes, every adapter, every transport
    wrong = [
        f"{where}.{item.name}"
        for where, node in classes
        for item in node.body
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name in OTHER_NAMES
    ]
    assert not wrong, f"rename to start/aclose: {wrong}"


def test_an_adapter_is_an_async_context_manager() -> None:
    async def main() -> ProcessAdapter:
        async with ProcessAdapter({}, environment="lifecycle") as adapter:
            assert isinstance(adapter, ProcessAdapter)
            assert not adapter._closing
        return adapter

    assert asyncio.run(main())._closing
