"""Plain executor names in a real wove 2.x ``wove_config.py``, through ``install()``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("wove", reason="the wove extra is part of `dev`; install it")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support"))

from wove_install import assert_ran_on_ours, run_user_program


def test_plain_process_name_runs_on_ours(tmp_path: Path) -> None:
    result = run_user_program(tmp_path, "process", {"max_requeues": 1})
    assert_ran_on_ours(result)


def test_without_install_wove_is_untouched(tmp_path: Path) -> None:
    # stdio is a name both wove and we know: without install() wove builds its own.
    result = run_user_program(tmp_path, "stdio", {}, install=False)
    assert result["built"] == "StdioEnvironmentExecutor", result
    assert result["total"] == 9900
    assert "timeout" not in result  # our tasks table is not read without install()


def test_a_typo_in_executor_config_fails_the_weave_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="unknown executor_config key 'max_requeus'"):
        run_user_program(tmp_path, "process", {"max_requeus": 1}, timeout=120)


def test_install_refuses_a_wove_without_the_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    import wove.environment

    import wove_adapters.integration.wove as wa

    monkeypatch.delattr(wove.environment, "coerce_executor")
    with pytest.raises(RuntimeError, match="Pin wove==2.0.3"):
        wa.install()
    assert not wa.installed()
