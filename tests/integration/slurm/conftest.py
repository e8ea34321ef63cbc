"""A real one-node Slurm cluster (slurmctld + slurmd + munged), started for the session
by ``scripts/services/slurm`` (which installs slurm-wlm and munge from Debian if needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[3]
SLURM_DIR = os.environ.get("WOVE_SLURM_DIR", "/var/tmp/wove-slurm")
SLURM_CONF = f"{SLURM_DIR}/slurm.conf"


@pytest.fixture(scope="session")
def slurm_cluster() -> Any:
    script = ROOT / "scripts" / "services" / "slurm"
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    was_running = (
        subprocess.run(["sinfo", "-h"], capture_output=True, env=env, check=False).returncode == 0
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
    spool = Path(SLURM_DIR) / "shared" / f"spool-{os.getpid()}"
    spool.mkdir(parents=True, exist_ok=True)
    yield {"slurm_conf": SLURM_CONF, "spool_dir": str(spool)}
    if not was_running:  # stop only what this session started
        subprocess.run([str(script), "stop"], check=False, timeout=60)


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None
