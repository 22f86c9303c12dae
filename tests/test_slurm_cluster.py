"""submitit on a real SLURM cluster: the dev cluster of slurm/dev-cluster.sh (started here if it is not running).

    .venv/bin/python -m pytest -q -m slurm tests/test_slurm_cluster.py

Needs root and apt on Debian the first time (the script installs its packages). A cluster this session
started is stopped at the end; one that was already running is left running.
"""
import os
import shutil
import time

import pytest

from slurm.dispatch import Dispatcher, Task
from slurm.backend import make_backend, make_executor
from slurm.executors import Resources

from .slurm_fixture import REPO, sacct_state, slurm_cluster  # noqa: F401  (registers the session fixture)

pytestmark = pytest.mark.slurm


# --------------------------------------------------------------------------- functions run inside the jobs
def _gpu_report(x):
    return {"value": 2 * x, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpus": os.environ.get("SLURM_JOB_GPUS"), "rank": int(os.environ.get("SLURM_PROCID", "-1"))}


def _sleep(seconds):
    time.sleep(seconds)
    return seconds


def _square(x):
    return x * x


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def executor_for(slurm_cluster, tmp_path):
    def make(**resources):
        resources = {"timeout_min": 5, "setup": [f"export PYTHONPATH={REPO}"], **resources}
        return make_executor("slurm", tmp_path / "jobs", Resources(**resources), job_name="pytest")
    return make


@pytest.fixture(scope="module")
def gpu_job(slurm_cluster, tmp_path_factory):
    """One finished one-GPU job, with its submit-to-result latency."""
    resources = Resources(gpus_per_node=1, timeout_min=5, setup=[f"export PYTHONPATH={REPO}"])
    executor = make_executor("slurm", tmp_path_factory.mktemp("gpu_job"), resources, job_name="pytest-gpu")
    t0 = time.monotonic()
    job = executor.submit(_gpu_report, 21)
    result = job.result()
    return job, result, time.monotonic() - t0


# --------------------------------------------------------------------------- tests
def test_auto_chooses_slurm_when_the_cluster_answers(slurm_cluster, tmp_path):
    assert make_executor("auto", tmp_path).cluster == "slurm"


def test_gpu_job_returns_its_result_and_sees_its_gpu(gpu_job):
    job, result, latency_s = gpu_job
    assert result["value"] == 42
    assert result["cuda"] is not None and len(result["cuda"].split(",")) == 1, result
    assert result["gpus"] is not None, "SLURM_JOB_GPUS is unset: the GRES was not allocated"
    assert latency_s < 30, f"a trivial job took {latency_s:.1f} s from submit to result"


def test_sacct_records_the_job_completed(gpu_job):
    job, _, _ = gpu_job
    assert sacct_state(job.job_id) == "COMPLETED"


def test_one_task_per_gpu_by_default(executor_for):
    job = executor_for(gpus_per_node=2).submit(_gpu_report, 1)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert all(len(r["cuda"].split(",")) == 2 for r in results), results


def test_a_cancelled_job_settles_promptly_with_its_state(slurm_cluster, tmp_path):
    d = Dispatcher(make_backend("slurm", tmp_path / "jobs", Resources(timeout_min=5,
                                                                      setup=[f"export PYTHONPATH={REPO}"]),
                                job_name="pytest"))
    [a] = d.submit([Task("0", _sleep, (300,))])
    deadline = time.monotonic() + 60
    while d.poll([a]) == [] and a.state != "RUNNING":
        assert time.monotonic() < deadline, f"job never started: {a.state} {a.reason}"
        time.sleep(0.5)
    d.cancel(a)
    t0 = time.monotonic()
    while not (settled := d.poll([a])):
        assert time.monotonic() - t0 < 40, f"cancellation not seen after 40 s (state {a.state})"
        time.sleep(0.5)
    outcome = settled[0][1]
    assert not outcome.ok and outcome.state == "CANCELLED" and "CANCELLED" in outcome.reason


def test_batch_submits_an_array(executor_for):
    executor = executor_for()
    with executor.batch():
        jobs = [executor.submit(_square, x) for x in range(4)]
    array_ids = {job.job_id.split("_")[0] for job in jobs}
    assert len(array_ids) == 1 and all("_" in job.job_id for job in jobs), [job.job_id for job in jobs]
    assert [job.result() for job in jobs] == [0, 1, 4, 9]


def test_one_poll_asks_sacct_once_and_squeue_once_for_many_jobs(slurm_cluster, tmp_path, monkeypatch):
    d = Dispatcher(make_backend("slurm", tmp_path / "jobs", Resources(timeout_min=5,
                                                                      setup=[f"export PYTHONPATH={REPO}"]),
                                job_name="pytest"))
    attempts = d.submit([Task(str(k), _sleep, (60,)) for k in range(3)])
    try:
        calls = tmp_path / "calls"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        for name in ("sacct", "squeue"):
            (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $@" >> {calls}\nexec {shutil.which(name)} "$@"\n')
            (bin_dir / name).chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        assert d.poll(attempts) == []
        lines = calls.read_text().splitlines()
        assert sorted(line.split()[0] for line in lines) == ["sacct", "squeue"], lines
        assert all(a.job_id in line for line in lines for a in attempts), lines
        assert {a.state for a in attempts} <= {"PENDING", "RUNNING"}
    finally:
        for a in attempts:
            d.cancel(a)
