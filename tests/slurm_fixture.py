"""The dev SLURM cluster as a pytest fixture, and sacct helpers, shared by the SLURM-marked test modules.

    from tests.slurm_fixture import slurm_cluster  # noqa: F401  (in a test module: registers the fixture)

`slurm_cluster` starts slurm/dev-cluster.sh if it is not running (root and apt on Debian the first time),
exports SLURM_CONF for this process and the processes it starts, and stops the cluster at the end of the
session if it started it. Imported by several modules, each registers it; the first start wins and only
that one stops the cluster.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "dev-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    """SLURM_CONF of a running dev cluster (started here, and then stopped at the end, if needed)."""
    if os.geteuid() != 0:
        pytest.skip("the dev SLURM cluster needs root (it starts munged, MariaDB and the SLURM daemons)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    was_running = subprocess.run([str(SCRIPT), "status"], capture_output=True).returncode == 0
    started = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.fail(f"slurm/dev-cluster.sh start failed:\n{started.stderr}")
    conf = started.stdout.strip().rsplit("SLURM_CONF=", 1)[1]
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", conf)
    yield conf
    patch.undo()
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def sacct(*args: str) -> list[list[str]]:
    """sacct's parsable rows (no header) for the given arguments."""
    out = subprocess.run(["sacct", "-n", "-P", *args], capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def sacct_state(job_id: str, timeout_s: float = 15.0) -> str:
    """The job's state in accounting, waiting up to timeout_s for slurmdbd to record its end (1-2 s late)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sacct("-X", "-j", job_id, "-o", "State")
        state = rows[-1][0].split(" ")[0] if rows else ""
        if state not in ("", "PENDING", "RUNNING", "REQUEUED", "COMPLETING") or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def sacct_history(job_id: str) -> list[str]:
    """Every state the job went through, oldest first (sacct -D: one record per requeue)."""
    return [row[0].split(" ")[0] for row in sacct("-X", "-D", "-j", job_id, "-o", "State")]
