"""Points 2, 3 (hub.result) and 7 of the lifecycle issue, on the real local executor.

- A call-site setting beats every configured source, the file's ``tasks.<name>`` included.
- ``--config``-style explicit paths are relative to the working directory, never searched.
- ``delivery_timeout`` leaves no never-awaited coroutine behind.
- ``hub.result`` finds a run in whichever ledger its environment uses.
"""

from __future__ import annotations

import gc
import time
import warnings
from pathlib import Path

import pytest

from wove_adapters import Hub
from wove_adapters.core.config import load_config
from wove_adapters.core.errors import DeliveryTimeoutError


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_call_site_timeout_beats_the_files_tasks_table(tmp_path: Path) -> None:
    config = tmp_path / "wove_config.toml"
    config.write_text('[tasks.nap]\ndelivery_timeout = 100\n')
    with Hub(config_file=str(config)) as hub:
        assert hub.config.task_settings("nap")["delivery_timeout"] == 100
        started = time.monotonic()
        with pytest.raises(DeliveryTimeoutError):
            hub.map(nap, [2.0], delivery_timeout=0.3)
        assert time.monotonic() - started < 1.9
        with pytest.raises(DeliveryTimeoutError):
            hub.run(nap, 2.0, task_options={"delivery_timeout": 0.3})


def test_explicit_config_path_is_never_searched_upwards(tmp_path: Path) -> None:
    (tmp_path / "x.toml").write_text("retries = 7\n")
    below = tmp_path / "below"
    below.mkdir()
    with pytest.raises(FileNotFoundError, match=str(below / "x.toml")):
        load_config(None, config_file="./x.toml", environ={}, cwd=below)
    assert load_config(None, config_file="../x.toml", environ={}, cwd=below).defaults[
        "retries"] == 7


def test_delivery_timeout_leaves_no_unawaited_coroutine() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Hub(delivery_timeout=5) as hub:
            assert [hub.run(abs, -i) for i in range(20)] == list(range(20))
        gc.collect()
    assert [str(w.message) for w in caught if "never awaited" in str(w.message)] == []


def test_hub_result_finds_the_ledger_of_the_runs_environment(tmp_path: Path) -> None:
    other = f"sqlite:///{tmp_path / 'reports.db'}"
    environments = {"reports": {"executor": "local", "ledger": other,
                                "delivery_idempotency_key": "nap-{seconds}"}}
    with Hub(environments=environments) as hub:
        future = hub.submit(nap, 0.01, environment="reports")
        assert future.result() == 0.01
    with Hub(environments=environments) as reader:
        assert reader.result(future.run_id, timeout=5) == 0.01
    with Hub(environments={"plain": {"executor": "local", "ledger": other}}) as hub:
        future = hub.submit(nap, 0.01, environment="plain")
        future.result()
        with pytest.raises(LookupError, match="not kept"):
            hub.result(future.run_id)
