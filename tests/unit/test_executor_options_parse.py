"""An adapter reads its ``executor_config`` through its declared struct (``options``).

The struct is the one place a default lives: before, each adapter restated it in a
``config.get(key, default)`` beside the struct, and the two could drift apart unseen. These
tests pin the parse itself (what configuration sources write is coerced, unset is the
default, a value no declared type takes names its key) and that every built-in adapter
hands its own struct to its code, without its backend library installed.
"""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from wove_adapters.adapters import adapter_names, get_adapter_class
from wove_adapters.adapters.arq import ArqOptions
from wove_adapters.adapters.celery import CeleryOptions
from wove_adapters.adapters.slurm import SlurmOptions


def test_configuration_text_is_coerced_to_the_declared_types() -> None:
    # WOVE__ variables and TOML give strings and numbers; a path object comes from code.
    options = ArqOptions.of({
        "kill_after": "2.5", "max_concurrent_submits": "8", "redis_url": Path("/run/r.sock"),
        "job_id_prefix": 7,
    })
    assert options.kill_after == 2.5
    assert options.max_concurrent_submits == 8
    assert options.redis_url == "/run/r.sock"
    assert options.job_id_prefix == "7"


def test_unset_internal_and_undeclared_keys_leave_the_defaults() -> None:
    options = ArqOptions.of({"redis_url": None, "_key_id": "k1", "not_a_key": 1})
    default = ArqOptions()
    assert options.redis_url == default.redis_url == "redis://127.0.0.1:6379/0"
    assert not hasattr(options, "not_a_key")


def test_a_value_no_declared_type_takes_names_the_key() -> None:
    with pytest.raises(ValueError, match="'max_concurrent_submits' must be an integer"):
        ArqOptions.of({"max_concurrent_submits": "many"})


def test_a_value_of_a_member_type_is_kept_as_it_is() -> None:
    # ``bool | str``: a word stays a word (the adapter reads "off", "no", "0" as false).
    assert CeleryOptions.of({"pending_check": "off"}).pending_check == "off"
    assert CeleryOptions.of({"pending_check": 0}).pending_check is False
    assert CeleryOptions.of({"app": object}).app is object  # Any passes through


def test_a_dashed_key_fills_its_field() -> None:
    assert SlurmOptions.of({"cpus-per-task": 4}).cpus_per_task_dashed == "4"


@pytest.mark.parametrize("name", sorted(adapter_names()))
def test_every_adapter_reads_its_own_struct(name: str, tmp_path: Path) -> None:
    cls = get_adapter_class(name, require_backend=False)
    assert cls.config_struct is not None
    config = {"spool_dir": str(tmp_path)} if "spool_dir" in _keys(cls.config_struct) else {}
    adapter = cls(config, environment="t")
    assert type(adapter.options) is cls.config_struct
    assert adapter.options == cls.config_struct.of(config)


def _keys(struct: type[msgspec.Struct]) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(struct)}
