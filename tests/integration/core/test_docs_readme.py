"""The README's programs run as written, in a fresh interpreter, and print nothing else.

The snippets are read from README.md itself (the code block after each
``<!-- tested: NAME -->`` marker), so the test and the page cannot drift apart. The weave
snippet needs the real ``wove`` 2.x (part of the ``dev`` extra).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
README = (ROOT / "README.md").read_text()


def snippet(name: str) -> str:
    match = re.search(rf"<!-- tested: {name} -->\n```python\n(.*?)```", README, re.S)
    assert match, f"README.md has no code block marked <!-- tested: {name} -->"
    return match.group(1)


def run_as_written(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """A new user's run: a fresh interpreter, an empty working directory, a fresh data
    directory (ledger, keys), no configuration file."""
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WOVE")}
    env["WOVE_ADAPTERS_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hello_world_prints_its_result_and_nothing_else(tmp_path: Path) -> None:
    done = run_as_written(snippet("hello"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "3\n"
    assert done.stderr == ""


def test_the_weave_snippet_runs_as_written(tmp_path: Path) -> None:
    pytest.importorskip("wove", reason="the weave snippet needs wove 2.x (the dev extra)")
    import wove

    assert wove.__version__.startswith("2."), wove.__version__
    done = run_as_written(snippet("weave"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[5, 6, 7]\n"
    assert done.stderr == ""


def test_an_unknown_name_says_it_is_neither_an_environment_nor_an_executor() -> None:
    """The old README snippet called ``executor("images")`` with no such environment and
    was told only about executors."""
    pytest.importorskip("wove", reason="the bridge needs wove 2.x (the dev extra)")
    from wove_adapters.integration.wove import executor

    config = {"environments": {"reports": {"executor": "stdio"},
                               "thumbnails": {"executor": "process"}}}
    with pytest.raises(ValueError) as caught:
        executor("images", config=config)
    message = str(caught.value)
    assert "'images' is neither a configured environment nor an executor name" in message
    assert "Configured environments: default, reports, thumbnails." in message
    for name in ("local", "stdio", "process", "celery", "rq", "temporal"):
        assert name in message.split("Executor names:", 1)[1]
    assert "[environments.images]" in message
    with pytest.raises(ValueError, match="Did you mean 'reports'"):
        executor("reprots", config=config)
    # A name that is an environment, or an executor, still works.
    assert executor("reports", config=config) is not None
    assert executor("stdio", config=config) is not None


def test_the_readme_says_how_long_the_tests_take_and_how_to_run_one_backend() -> None:
    assert re.search(r"takes about \d+ minutes", README)
    assert "python3 -m tox -e celery" in README
    assert "python3 -m tox -e core -- -k" in README
