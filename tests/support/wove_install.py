"""A user's program with plain executor names in its ``wove_config.py`` (issue 14, part 1).

Each check runs as a real program in a fresh interpreter in its own directory: wove finds
``wove_config.py`` there by itself, exactly as in an application, and neither wove's
process-wide configuration nor ``install()`` leaks into other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

CONFIG = """\
import wove_adapters.integration.wove as wa
{install}
environments = {{
    "batch": {{"executor": {executor!r}, "executor_config": {executor_config!r}}},
    # executor(...) written inside wove_config.py: resolved when the weave starts it.
    "named": {{"executor": wa.executor("stdio")}},
}}
# Our task table, from the same file: wove itself sets no timeout for "slow".
tasks = {{"slow": {{"delivery_timeout": 2.0}}}}
"""

PROGRAM = """\
import json, os, time
import wove, wove.environment, wove.errors
import wove_adapters.core.errors as ours

out = {}
wove.config()  # wove autoloads ./wove_config.py, as in an application

with wove.weave() as w:
    @w.do
    def items():
        return list(range(100))

    @w.do("items", environment="batch")
    def double(item):
        return item * 2, os.getpid()

    @w.do(environment="named")
    def elsewhere():
        return os.getpid()

out["total"] = sum(value for value, _ in w.result.double)
out["remote"] = all(pid != os.getpid() for _, pid in w.result.double)
out["named_remote"] = w.result.elsewhere != os.getpid()

with wove.weave() as w:
    @w.do(environment="batch")
    def broken():
        raise LookupError("no such row")

try:
    w.result.broken
except LookupError as exc:
    out["error"] = [type(exc).__name__, str(exc)]

started = time.monotonic()
try:
    with wove.weave() as w:
        @w.do(environment="batch")
        def slow():
            time.sleep(30)

    w.result.slow
except wove.environment.DeliveryTimeoutError as exc:
    out["timeout"] = [type(exc).__module__, round(time.monotonic() - started, 1)]

out["dispatch_is_wove"] = issubclass(
    ours.MissingDispatchFeatureError, wove.errors.MissingDispatchFeatureError
)
out["built"] = type(wove.environment.coerce_executor(EXECUTOR)).__name__
print("RESULT " + json.dumps(out))
"""


def run_user_program(
    directory: Path, executor: str, executor_config: dict[str, Any], *, install: bool = True,
    timeout: float = 240.0,
) -> dict[str, Any]:
    """Write ``wove_config.py`` and a program into ``directory``, run it, return what it
    printed. A failure shows the program's whole output."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "wove_config.py").write_text(
        CONFIG.format(
            install="wa.install()" if install else "",
            executor=executor,
            executor_config=executor_config,
        )
    )
    (directory / "program.py").write_text(PROGRAM.replace("EXECUTOR", repr(executor)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("WOVE_CONFIG_FILE", None)
    proc = subprocess.run(
        [sys.executable, "program.py"], cwd=directory, env=env, capture_output=True,
        text=True, timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"program exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT "):])
    result["stderr"] = proc.stderr
    return result


def assert_ran_on_ours(result: dict[str, Any]) -> None:
    """What every plain-name program must show with install()."""
    assert result["total"] == sum(i * 2 for i in range(100)), result
    assert result["remote"] and result["named_remote"], result
    assert result["error"] == ["LookupError", "no such row"], result
    module, seconds = result["timeout"]
    assert module == "wove_adapters.core.errors", result  # ours, caught as wove's class
    assert 1.5 <= seconds < 20, result  # the tasks table's 2 s, not wove's (none)
    assert result["dispatch_is_wove"] is True
    assert result["built"] == "WoveAdaptersExecutor", result
