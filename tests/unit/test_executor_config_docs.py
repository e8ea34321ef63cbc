"""Each adapter's docs option table and its declared ``executor_config`` stay in step.

The struct at the top of each adapter module is what start-up accepts; the table under
``| key | default | meaning |`` in ``docs/adapters/<name>.md`` is what users read. Every
key the adapter adds must be documented there, and every documented key must be accepted
(shared keys may be repeated where the adapter's default differs). The shared keys are
documented once, in docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from wove_adapters.adapters import adapter_names
from wove_adapters.core.options import AdapterOptions, ExecutorOptions, option_keys, own_option_keys
from wove_adapters.integration.executor_config import config_struct_for

DOCS = Path(__file__).resolve().parents[2] / "docs"


def documented_keys(path: Path) -> set[str]:
    """Backticked names in the first column of every ``| key | ...`` table in ``path``."""
    keys: set[str] = set()
    in_table = False
    for line in path.read_text().splitlines():
        if re.match(r"\|\s*key\s*\|", line):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        if in_table and not line.startswith("|---"):
            first = line.split("|")[1]
            keys.update(re.findall(r"`([^`]+)`", first))
    return keys


@pytest.mark.parametrize("name", adapter_names())
def test_docs_table_matches_the_struct(name: str) -> None:
    struct = config_struct_for(name)
    assert struct is not None, f"{name} declares no config_struct"
    documented = documented_keys(DOCS / "adapters" / f"{name}.md")
    missing = sorted(set(own_option_keys(struct)) - documented)
    assert not missing, f"docs/adapters/{name}.md does not document: {missing}"
    unknown = sorted(documented - set(option_keys(struct)))
    assert not unknown, f"docs/adapters/{name}.md documents keys {name} refuses: {unknown}"


def test_shared_keys_are_documented_once() -> None:
    documented = documented_keys(DOCS / "configuration.md")
    assert documented == set(option_keys(AdapterOptions)), (
        sorted(documented ^ set(option_keys(AdapterOptions))))
    assert set(option_keys(ExecutorOptions)) <= set(option_keys(AdapterOptions))
