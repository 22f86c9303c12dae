"""On the dev SLURM cluster: a budget in CPU-hours read from accounting, and a controller outage that costs nothing.

    .venv/bin/python -m pytest -q -m slurm tests/test_slurm_spend_outage.py
"""
import os
import shutil
import uuid

import pytest

from orchestrator.study.journal import Journal, load_study

from .slurm_fixture import (finish, orchestrator, sacct, slurm_cluster, study_yaml, wait_until)  # noqa: F401

pytestmark = pytest.mark.slurm


def test_the_spend_is_read_from_accounting_and_no_trial_passes_the_budget(slurm_cluster, tmp_path):
    study = f"spend-{uuid.uuid4().hex[:8]}"
    config = study_yaml(tmp_path, study=study, algo="random", parallel=2, executor="slurm", poll_s=0.3,
                        objective="tests.objectives:slow_landscape", budget={"evaluations": 30, "gpu_hours": 0.012},
                        resources={"cpus_per_task": 1, "timeout_min": 5})
    output = finish(orchestrator(tmp_path, "--config", config, env={"LORA_HPO_TEST_SLEEP": "6"}), 600)
    state = load_study(tmp_path / "runs" / study)
    spent = [t.summary["gpu_hours"] for t in state.finished]
    assert 2 <= len(spent) < 30 and "the budget is spent" in output, output[-600:]
    # each trial's spend is what SLURM accounted: elapsed x CPUs of every job of the trial
    accounted = {row[0]: int(row[1]) * int(row[2]) / 3600 for row in sacct("-X", "-j", ",".join(
        t.job.job_id for t in state.finished), "-o", "JobID,ElapsedRaw,AllocCPUS")}
    for t in state.finished:
        assert t.summary["gpu_hours"] == pytest.approx(accounted[t.job.job_id], abs=2 / 3600), (t.trial, accounted)
    # no trial was started that the expected cost said would pass the budget: only the last wave may overrun it,
    # by less than one trial's mean
    assert sum(spent) <= 0.012 + max(spent), spent
    assert "CPU-h" in output


def test_a_controller_outage_defers_submissions_and_fails_nothing(slurm_cluster, tmp_path):
    """While `down` exists, sbatch answers as it does when slurmctld cannot be reached (a wrapper in front of the
    real sbatch: a stand-in for the outage, so that it starts and ends at known moments); sacct and squeue
    keep working. No trial may fail, no evaluation may be lost or run twice, the wait is shown."""
    study = f"outage-{uuid.uuid4().hex[:8]}"
    marks, down, wrappers = tmp_path / "marks", tmp_path / "down", tmp_path / "bin"
    marks.mkdir()
    wrappers.mkdir()
    real = shutil.which("sbatch")
    (wrappers / "sbatch").write_text(f"#!/bin/sh\nif [ -e {down} ]; then\n  echo 'sbatch: error: Batch job submission "
                                     f"failed: Unable to contact slurm controller (connect failure)' >&2\n  exit 1\n"
                                     f"fi\nexec {real} \"$@\"\n")
    (wrappers / "sbatch").chmod(0o755)
    env = {"LORA_HPO_TEST_MARKS": str(marks), "LORA_HPO_TEST_SLEEP": "3",
           "PATH": f"{wrappers}{os.pathsep}{os.environ['PATH']}"}
    proc = orchestrator(tmp_path, "--algo", "random", "--study", study, "--budget", "4", "--parallel", "2",
                        "--executor", "slurm", "--objective", "tests.objectives:slow_landscape", "--poll", "0.3",
                        env=env)
    journal = Journal(tmp_path / "runs" / study / "journal.jsonl")
    progress = tmp_path / "runs" / study / "progress.txt"
    wait_until(lambda: journal.exists() and any(t.job.job_id for t in journal.load().running), 120,
               "the first jobs", proc)
    down.touch()  # the outage starts: the next submissions cannot reach the controller
    wait_until(lambda: progress.exists() and "scheduler unreachable" in progress.read_text(), 300,
               "a submission waiting for the controller", proc)
    assert not any(t.status == "failed" for t in journal.load().finished), "the outage failed a trial"
    down.unlink()  # the controller is back
    finish(proc, 600)
    state = journal.load()
    assert state.ended and len(state.finished) == 4 and all(t.status == "ok" for t in state.finished)
    assert len(list(marks.iterdir())) == 4, "an evaluation was lost or ran twice"
