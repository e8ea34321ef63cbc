"""The top floor stays small: size budgets for ``wove_adapters/adapters/``.

An adapter only talks to its backend (docs/design.md, "Size budgets"). When a backend
module outgrows its budget, the usual cause is machinery whose logic does not depend
on the backend (a process pool, a key claim, a follower, a status cache, a signer), and
its place is ``core/``, ``worker/`` or the transport, where every adapter shares one
copy. These budgets make that drift fail a test instead of waiting for a reader to
notice. A budget is raised only with a reason written beside it in docs/design.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wove_adapters

ADAPTERS = Path(wove_adapters.__file__).parent / "adapters"
MODULE_LINES = 560
CLASS_LINES = 300
# Kubernetes: the Job manifest and its conditions are real backend talk.
WIDER = {"kubernetes_jobs.py": 750, "KubernetesJobsAdapter": 550}
# The whole package, see docs/design.md ("Size budgets") for how this number was set.
TOTAL_LINES = 6_850


def _modules() -> dict[str, str]:
    return {path.name: path.read_text() for path in sorted(ADAPTERS.glob("*.py"))}


def _adapter_classes() -> dict[str, int]:
    """Every ``BackendAdapter`` subclass defined in ``adapters/`` -> its length in lines."""
    found: dict[str, int] = {}
    for source in _modules().values():
        for node in ast.parse(source).body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases = {getattr(base, "id", getattr(base, "attr", "")) for base in node.bases}
            if "BackendAdapter" in bases:
                assert node.end_lineno is not None
                found[node.name] = node.end_lineno - node.lineno + 1
    return found


def test_each_adapter_module_fits_its_budget() -> None:
    over = {
        name: lines
        for name, source in _modules().items()
        if (lines := len(source.splitlines())) > WIDER.get(name, MODULE_LINES)
    }
    assert not over, (
        f"adapter modules over budget ({MODULE_LINES} lines; {WIDER}): {over}. Move what "
        f"does not depend on the backend to core/, worker/ or the transport."
    )


def test_each_adapter_class_fits_its_budget() -> None:
    classes = _adapter_classes()
    # Not vacuous: every built-in backend's class is measured.
    assert len(classes) >= 11, sorted(classes)
    over = {name: n for name, n in classes.items() if n > WIDER.get(name, CLASS_LINES)}
    assert not over, (
        f"adapter classes over budget ({CLASS_LINES} lines; {WIDER}): {over}. The class "
        f"fills submit/cancel/status_many; helpers go to module functions or shared code."
    )


def test_the_adapters_package_fits_its_total() -> None:
    total = sum(len(source.splitlines()) for source in _modules().values())
    assert total > 4_000, "adapters/ looks empty: is the package installed from source?"
    assert total <= TOTAL_LINES, (
        f"wove_adapters/adapters/ is {total} lines, over its budget of {TOTAL_LINES}. New "
        f"backend talk pays for itself: move shared machinery out of the adapters first, "
        f"or raise the budget in docs/design.md with the reason."
    )
