"""A real one-node Slurm cluster (slurmctld + slurmd + munged), started for the session
by ``scripts/services/slurm`` (which installs slurm-wlm and munge from Debian if needed).

The node reading idle is not enough: the session begins only once a job has run on it,
and a failed test carries the cluster's view (queue with reasons, node, daemon logs), so
a cluster that stops running jobs in CI says why in the report."""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
SLURM_DIR = os.environ.get("WOVE_SLURM_DIR", "/var/tmp/wove-slurm")
SLURM_CONF = f"{SLURM_DIR}/slurm.conf"


@pytest.fixture(scope="session")
def slurm_cluster() -> Any:
    script = ROOT / "scripts" / "services" / "slurm"
    was_running = (
        subprocess.run(["sinfo", "-h"], capture_output=True, env=_env(), check=False).returncode
        == 0
        if _has("sinfo")
        else False
    )
    done = subprocess.run([str(script), "start"], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        pytest.fail(
            "could not start the local Slurm cluster with scripts/services/slurm start "
            f"(needs root and apt-get for slurm-wlm/munge):\n{done.stdout}\n{done.stderr}"
        )
    os.environ["SLURM_CONF"] = SLURM_CONF
    failed = _probe()
    if failed:
        # Once, as a supervisor would: a cluster that cannot run a job (a dead slurmd, a
        # backlog of jobs whose callers are gone) is restarted with a clean controller
        # state (``slurmctld -c``), even one an earlier session left running.
        first = f"{failed}\n{cluster_state()}"
        subprocess.run([str(script), "stop"], check=False, timeout=60)
        subprocess.run([str(script), "start"], capture_output=True, timeout=600, check=False)
        failed = _probe()
        if not failed:
            warnings.warn(f"the Slurm cluster ran no job until restarted: {first}",
                          stacklevel=1)
    if failed:
        pytest.fail(f"the local Slurm cluster is up but {failed}:\n{cluster_state()}")
    spool = Path(SLURM_DIR) / "shared" / f"spool-{os.getpid()}"
    spool.mkdir(parents=True, exist_ok=True)
    yield {"slurm_conf": SLURM_CONF, "spool_dir": str(spool)}
    if not was_running:  # stop only what this session started
        subprocess.run([str(script), "stop"], check=False, timeout=60)


# sinfo's node states that run no new job until an administrator (or slurmd) acts; any
# other (idle, mixed, allocated, completing, planned, ...) takes work now or later.
_CANNOT_TAKE_WORK = frozenset({"down", "drain", "drained", "draining", "fail", "failing",
                               "inval", "future"})


@pytest.fixture(autouse=True)
def _node_takes_work(request: pytest.FixtureRequest) -> None:
    """A test that would wait on a node that is down or drained fails within 30 s,
    saying why, instead of running into its own timeouts one by one (a node that comes
    back by itself within that, as ReturnToService=2 allows, is fine). The conformance
    tests reach the cluster through ``getfixturevalue``: it is asked for here, for all."""
    request.getfixturevalue("slurm_cluster")
    deadline = time.monotonic() + 30
    while True:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                                env=_env(), timeout=30, check=False).stdout.split()
        if not states or any(s.rstrip("*~#!%$@^-+") not in _CANNOT_TAKE_WORK for s in states):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the Slurm node cannot take work ({states}):\n{cluster_state()}")
        time.sleep(1)


def _env() -> dict[str, str]:
    """This environment with the test cluster's config, for Slurm's commands."""
    return {**os.environ, "SLURM_CONF": SLURM_CONF}


def _probe() -> str:
    """A job run to its end on the node (``sbatch --wait``): '' or what went wrong."""
    try:
        probe = subprocess.run(
            ["sbatch", "--wait", "--quiet", "--job-name=wove-probe", "--output=/dev/null",
             "--wrap", "true"],
            capture_output=True, text=True, env=_env(), timeout=60, check=False,
        )
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", "--name=wove-probe"], env=_env(), check=False, timeout=30)
        return "a probe job (sbatch --wait --wrap true) did not finish within 60 s"
    if probe.returncode != 0:
        return f"a probe job failed (sbatch --wait: {probe.returncode} {probe.stderr.strip()})"
    return ""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:  # this directory's tests all run on the cluster
        report.sections.append(("slurm cluster", cluster_state()))
    return report


def cluster_state() -> str:
    """The queue with each job's reason, the node, and the daemons' last log lines."""
    env = _env()
    parts = []
    for command in (["squeue", "-h", "-o", "%i %j %T %r %M"], ["sinfo", "-R"],
                    ["scontrol", "-o", "show", "node"],
                    ["tail", "-n", "40", f"{SLURM_DIR}/slurmctld.log"],
                    ["tail", "-n", "40", f"{SLURM_DIR}/slurmd.log"]):
        try:
            done = subprocess.run(command, capture_output=True, text=True, env=env,
                                  timeout=20, check=False)
            parts.append(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            parts.append(f"$ {' '.join(command)}\n{exc}")
    return "\n".join(parts)


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None
