"""The layers stay layered: ``core`` imports nothing above it, adapters skip the dispatcher
and leave the shared machinery to the shared layers.

``core`` (frames, codec, signing, envelope, stores, the dispatcher, the ledgers, the
built-in executors) is what every other package builds on; if it imported
``callbacks``, ``adapters`` or a front end, the packages would depend on each other and
a change up there could break the ground floor. Function-local imports count (they are
how such cycles hide), and so do modules named as strings for a lazy import
(``importlib.import_module("...")``, ``__import__("...")``, ``"module:Class"`` targets).
Starting ``python -m wove_adapters.stdio_worker`` as a child process is not an import.

Adapters decode through ``core.codec``; importing the dispatcher module
(``core.runtime``) from an adapter would tie every backend to the dispatcher's internals.
And a backend's module keeps to talking to its backend: no unpickling, HMAC, process
pool, lease, key claim, follower or signer of its own (each has one shared home).
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


# What an adapter module must leave to the shared layers (issue 12's "an adapter only
# talks to its backend"): loading bytes that execute code (core.codec verifies first;
# writing a pickle for a backend's own workers is fine), HMAC signing (core.signing), and
# process pools (worker.pool). Function-local imports count.
_UNPICKLERS = ("pickle", "cloudpickle", "dill")
_LOADS = ("loads", "load", "Unpickler")
_DECODE = "decode through wove_adapters.core.codec, which verifies before it unpickles"
_MACHINERY_IMPORTS = {
    "hmac": "sign and verify with wove_adapters.core.signing",
    "multiprocessing": "isolate payloads with the one warm pool, wove_adapters.worker.pool",
    "concurrent.futures.process": "isolate payloads with wove_adapters.worker.pool",
    **{f"{module}.{name}": _DECODE for module in _UNPICKLERS for name in _LOADS},
}
# Classes whose kind has one shared home: keys are name endings, values that home.
_MACHINERY_CLASSES = {
    "Pool": "wove_adapters.worker.pool",
    "Lease": "wove_adapters.worker.leases",
    "Leases": "wove_adapters.worker.leases",
    "Claims": "wove_adapters.core.claims",
    "Follower": "wove_adapters.adapters.followers",
    "Followers": "wove_adapters.adapters.followers",
    "Signer": "wove_adapters.core.signing",
}
# The shared modules of the adapters package (the contract, the registry, the transport
# and its key followers): the rest are backends and their helpers.
_SHARED = {"__init__.py", "base.py", "registry.py", "transport.py", "followers.py"}


def machinery_in(source: str, importer: str) -> list[str]:
    """What in ``source`` belongs to a shared layer, with the line and where it goes."""
    found = []
    for lineno, module in imports_of(source, importer):
        for banned, home in _MACHINERY_IMPORTS.items():
            if module == banned or module.startswith(banned + "."):
                found.append(f"{lineno}: imports {module}: {home}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for ending, home in _MACHINERY_CLASSES.items():
                if node.name.endswith(ending):
                    found.append(f"{node.lineno}: class {node.name}: use {home}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "os" and node.attr in ("fork", "forkpty"):
                found.append(f"{node.lineno}: os.{node.attr}: use wove_adapters.worker.pool")
            elif node.value.id in _UNPICKLERS and node.attr in _LOADS:
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}: {_DECODE}")
    return found


def test_backend_modules_leave_the_machinery_to_the_shared_layers() -> None:
    backends = [p for p in _sources("wove_adapters.adapters") if p.name not in _SHARED]
    assert len(backends) >= 15, [p.name for p in backends]  # every backend and helper
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in backends
        for line in machinery_in(path.read_text(), _module_name(path))
    ]
    assert not found, (
        "an adapter module talks to its backend only; move this to the shared layer "
        "named:\n" + "\n".join(found)
    )


def test_the_machinery_check_sees_what_it_forbids() -> None:
    """Not vacuous: each forbidden form is reported."""
    source = (
        "import pickle; pickle.loads(b'')\n"
        "from hmac import compare_digest\n"
        "def later():\n"
        "    import multiprocessing.pool\n"
        "    from concurrent.futures.process import ProcessPoolExecutor\n"
        "    return os.fork()\n"
        "class _WarmPool: ...\n"
        "class KeyFollowers: ...\n"
        "class RedisClaims: ...\n"
        "import picklable_thing\n"
        "class Spool: ...\n"
        "from cloudpickle import loads\n"
        "data = pickle.dumps(None)\n"
    )
    found = machinery_in(source, "wove_adapters.adapters.acme")
    lines = sorted({int(entry.split(":")[0]) for entry in found})
    # Not picklable_thing, not Spool, not a pickle written for the backend's workers.
    assert lines == [1, 2, 4, 5, 6, 7, 8, 9, 12], found
