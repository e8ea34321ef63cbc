"""The layers stay layered: ``core`` imports nothing above it, adapters skip the dispatcher.

``core`` (frames, codec, signing, envelope, stores, the dispatcher, the ledgers, the
built-in executors) is what every other package builds on; if it imported
``callbacks``, ``adapters`` or a front end, the packages would depend on each other and
a change up there could break the ground floor. Function-local imports count (they are
how such cycles hide), and so do modules named as strings for a lazy import
(``importlib.import_module("...")``, ``__import__("...")``, ``"module:Class"`` targets).
Starting ``python -m wove_adapters.stdio_worker`` as a child process is not an import.

Adapters decode through ``core.codec``; importing the dispatcher module
(``core.runtime``) from an adapter would tie every backend to the dispatcher's internals.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import wove_adapters

PACKAGE = Path(wove_adapters.__file__).parent
CORE = "wove_adapters.core"
# "package.module:Attr", the form lazy registries (stores, adapters) keep as strings.
_TARGET = re.compile(r"^(wove_adapters(?:\.\w+)+):\w+$")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str | None, level: int, importer: str, is_package: bool) -> str:
    """``from ..x import y`` in ``importer`` -> the absolute module name."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, module] if module else base)


def imports_of(source: str, importer: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """Every module ``source`` imports, anywhere in it, with its line: ``import x``,
    ``from x import y`` (each ``y`` too, as it may be a submodule), string literals given
    to ``importlib.import_module`` / ``__import__``, and ``"module:Attr"`` strings."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, importer, is_package)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    yield node.lineno, first.value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _TARGET.match(node.value)
            if match:
                yield node.lineno, match.group(1)


def _above_core(module: str) -> bool:
    """A module of this package outside ``core`` (the bare package is allowed: importing
    any submodule imports it, and its ``__init__`` imports nothing eagerly)."""
    if module == CORE or module.startswith(CORE + "."):
        return False
    return module.startswith("wove_adapters.")


def _sources(package: str) -> list[Path]:
    root = PACKAGE.joinpath(*package.split(".")[1:])
    return sorted(root.rglob("*.py"))


def _violations(package: str, forbidden: Callable[[str], bool]) -> list[str]:
    found = []
    for path in _sources(package):
        importer = _module_name(path)
        source = path.read_text()
        lines = source.splitlines()
        for lineno, module in imports_of(source, importer, path.name == "__init__.py"):
            if forbidden(module):
                where = path.relative_to(PACKAGE.parent)
                found.append(f"{where}:{lineno}: {module}  ({lines[lineno - 1].strip()})")
    return sorted(set(found))


def test_core_imports_nothing_above_core() -> None:
    assert _sources(CORE), "no modules found under wove_adapters/core"
    found = _violations(CORE, _above_core)
    assert not found, (
        "wove_adapters/core must not import anything above core (move what it needs "
        "into core, or the caller passes it in):\n" + "\n".join(found)
    )


def test_no_adapter_imports_the_dispatcher_module() -> None:
    def dispatcher(module: str) -> bool:
        return module == "wove_adapters.core.runtime" or module.startswith(
            "wove_adapters.core.runtime."
        )

    assert _sources("wove_adapters.adapters")
    found = _violations("wove_adapters.adapters", dispatcher)
    assert not found, (
        "adapters must not import the dispatcher module (wove_adapters.core.runtime); "
        "decode outcomes with wove_adapters.core.codec:\n" + "\n".join(found)
    )


def test_the_checker_sees_every_form_of_import() -> None:
    """Not vacuous: each form the rules cover is reported, with its line."""
    source = (
        "import wove_adapters.cli\n"
        "from wove_adapters.callbacks import receiver\n"
        "from ... import adapters\n"
        "def later():\n"
        "    from wove_adapters.integration.hub import Hub\n"
        "    importlib.import_module('wove_adapters.testing.tasks')\n"
        "    __import__('wove_adapters.worker')\n"
        "KINDS = {'s3': 'wove_adapters.adapters.aws_batch:S3Store'}\n"
        "from wove_adapters.core import frames\n"
        "from . import signing\n"
        "LOGGER = 'wove_adapters.runtime'\n"
    )
    found = [
        (line, module)
        for line, module in imports_of(source, "wove_adapters.core.executors.stdio")
        if _above_core(module)
    ]
    assert sorted(found) == [
        (1, "wove_adapters.cli"),
        (2, "wove_adapters.callbacks"),
        (2, "wove_adapters.callbacks.receiver"),
        (3, "wove_adapters.adapters"),
        (5, "wove_adapters.integration.hub"),
        (5, "wove_adapters.integration.hub.Hub"),
        (6, "wove_adapters.testing.tasks"),
        (7, "wove_adapters.worker"),
        (8, "wove_adapters.adapters.aws_batch"),
    ]
