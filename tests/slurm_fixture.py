"""The dev SLURM cluster as a pytest fixture, and sacct helpers, shared by the SLURM-marked test modules.

    from tests.slurm_fixture import slurm_cluster  # noqa: F401  (in a test module: registers the fixture)

`slurm_cluster` starts slurm/dev-cluster.sh (its fast profile) if it is not running (root and apt on Debian the
first time), exports SLURM_CONF for this process and the processes it starts, and stops the cluster at the end
of the session if it started it. `slurm_production` switches the same cluster to its production profile
(KillWait 30, the scheduler's default delays, preemption...) for a module's tests and back to fast after.
Imported by several modules, each registers them; the first start wins and only that one stops the cluster.
"""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from orchestrator.study.journal import Journal

from .conftest import orchestrator_process as orchestrator, uri  # noqa: F401  (the SLURM tests import both here)

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
    conf = start_profile("fast")
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", conf)
    yield conf
    patch.undo()
    if not was_running:
        subprocess.run([str(SCRIPT), "stop"], capture_output=True, timeout=120)


def start_profile(profile: str) -> str:
    """Start the dev cluster with that profile (a profile change restarts slurmctld and slurmd); its SLURM_CONF."""
    started = subprocess.run([str(SCRIPT), "start", "--profile", profile], capture_output=True, text=True,
                             timeout=900)
    if started.returncode != 0:
        pytest.fail(f"slurm/dev-cluster.sh start --profile {profile} failed:\n{started.stderr}")
    return started.stdout.strip().rsplit("SLURM_CONF=", 1)[1]


@pytest.fixture(scope="module")
def slurm_production(slurm_cluster):
    """The dev cluster in its production profile for this module's tests; back to fast afterwards."""
    conf = start_profile("production")
    yield conf
    start_profile("fast")


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


# --------------------------------------------------------------------------- studies on the cluster

def study_yaml(tmp_path, **settings) -> str:
    path = tmp_path / f"{settings['study']}.yaml"
    path.write_text(yaml.safe_dump(settings))
    return str(path)


def events(journal: Journal, kind: str | None = None) -> list[dict]:
    found = []
    for line in journal.path.read_text().splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            continue
    return [e for e in found if kind is None or e["event"] == kind]


def steps_done(out) -> int:
    path = Path(out) / "metrics.jsonl"
    return sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def wait_until(condition, timeout_s: float, what: str, proc=None):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the orchestrator exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)
    return value


def finish(proc, timeout_s: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the study did not finish within {timeout_s} s:\n{proc.communicate()[0]}")
    assert proc.returncode == 0, output
    return output


