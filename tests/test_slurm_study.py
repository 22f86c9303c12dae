"""Studies on a real SLURM cluster (the dev cluster of slurm/dev-cluster.sh, started here when needed).

    .venv/bin/python -m pytest -q -m slurm tests/test_slurm_study.py

Dispatch and accounting, job arrays for a block of trials, requeue / time-limit signal / cancellation of a
running fine-tune, a node failure retried per policy, kill -9 of the orchestrator and --resume, and jobs
pinned to the code the study started with. Fine-tunes use the tiny model; several studies search only
`keep_checkpoints` (no effect on the numbers) so that every trial trains the same way and an uninterrupted
trial is the reference of the interrupted ones.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import submitit
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.journal import Journal
from orchestrator.study import Study, run_study

from .slurm_fixture import REPO, sacct, sacct_history, sacct_state, slurm_cluster  # noqa: F401
from .conftest import kill_when

pytestmark = pytest.mark.slurm

GPU_JOB = {"partition": "gpu", "gpus_per_node": 1, "timeout_min": 10}
# Every trial trains identically: the one searched value only says how many checkpoints to keep.
SAME_TRAINING = {"keep_checkpoints": {"choice": [1, 2, 3, 4, 5, 6, 7, 8], "default": 1},
                 "r": {"fixed": 8}, "alpha": {"fixed": 16}, "dropout": {"fixed": 0.1}, "lr": {"fixed": 1e-3}}
MLFLOW_STATUS = {"COMPLETED": "FINISHED", "CANCELLED": "FAILED", "FAILED": "FAILED", "TIMEOUT": "FAILED"}


# --------------------------------------------------------------------------- helpers
def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def orchestrator(tmp_path, *args, env=None, cwd=REPO):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path),
         *args], cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


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


def child_runs(client, state, study):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{state.parent_run_id}'",
                              max_results=1000)


def assert_sacct_agrees_with_mlflow(client, state):
    for t in state.trials.values():
        run = client.get_run(t.run_id)
        assert run.data.tags["slurm_job_id"] == t.job_id, (t.trial, run.data.tags)
        job_state = sacct_state(t.job_id)
        assert MLFLOW_STATUS.get(job_state) == run.info.status, (t.trial, t.job_id, job_state, run.info.status)


# --------------------------------------------------------------------------- dispatch
def test_tiny_study_runs_on_slurm_and_accounting_agrees_with_mlflow(slurm_cluster, tiny_model_dir, tmp_path,
                                                                     monkeypatch):
    cfg = load_config(None, study="slurm-tiny", algo="tpe", budget=3, parallel=2, executor="slurm", poll_s=0.3,
                      seed=1, workdir=str(tmp_path / "runs"), tracking_uri=uri(tmp_path),
                      trial={"max_steps": 10, "data": {"total_rows": 300}}, resources=GPU_JOB)
    ticks, poll = [], Study._poll
    monkeypatch.setattr(Study, "_poll", lambda self: ticks.append(1) or poll(self))
    calls = submitit.SlurmJob.watcher.num_calls
    state = run_study(cfg, out=open(os.devnull, "w"))
    calls = submitit.SlurmJob.watcher.num_calls - calls
    assert calls <= len(ticks), f"{calls} sacct calls in {len(ticks)} polls: not one per poll for all jobs"
    assert len(state.finished) == 3 and all(t.status == "ok" for t in state.finished), \
        [(t.trial, t.reason) for t in state.finished]
    client = MlflowClient(cfg.tracking())
    node = sacct("-X", "-j", state.trials[0].job_id, "-o", "NodeList")[0][0]
    runs = child_runs(client, state, cfg.study)
    assert len(runs) == 3
    for run in runs:
        t = state.trials[int(run.data.tags["trial"])]
        assert run.data.tags["slurm_node"] == node and run.data.tags["executor"] == "slurm"
        assert run.data.metrics["val_loss"] == pytest.approx(t.value)
    assert_sacct_agrees_with_mlflow(client, state)
    # TPE's first two asks filled both slots at once: one job array, journaled before and after submission.
    first = [state.trials[i].job_id for i in (0, 1)]
    assert first[0].split("_")[0] == first[1].split("_")[0] and {j.split("_")[1] for j in first} == {"0", "1"}
    journal = Journal(cfg.folder / "journal.jsonl")
    order = [(e["event"], e["trial"]) for e in events(journal) if e["event"] in ("trial", "submitted")]
    assert order[:4] == [("trial", 0), ("trial", 1), ("submitted", 0), ("submitted", 1)], order
    parent = client.get_run(state.parent_run_id)
    assert parent.data.tags["code_snapshot"] == str((cfg.folder / "code").resolve())
    assert parent.data.tags["git_sha"] and (cfg.folder / "code" / "jobs" / "finetune.py").exists()


# --------------------------------------------------------------------------- interruptions
@pytest.mark.slow
def test_requeue_time_limit_and_cancel_keep_the_trial_and_its_result(slurm_cluster, tiny_model_dir, tmp_path):
    """Four identical fine-tunes as one array: one requeued (scontrol requeue: SIGTERM, then SIGKILL), one
    sent the time-limit signal (USR2, what --signal sends before the limit), one cancelled, one untouched."""
    steps = 40
    config = study_yaml(tmp_path, study="interrupts", algo="random", budget=5, parallel=4, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, resources=GPU_JOB,
                        trial={"max_steps": steps, "log_every": 1, "checkpoint_every": 0,
                               "data": {"total_rows": 300}})
    proc = orchestrator(tmp_path, "--config", config)
    journal = Journal(tmp_path / "runs" / "interrupts" / "journal.jsonl")
    actions = {0: (3, ["scontrol", "requeue"]), 1: (3, ["scancel", "--signal=USR2"]), 2: (1, ["scancel"])}
    acted = {}
    deadline = time.monotonic() + 120
    while len(acted) < len(actions):
        state = journal.load()
        for trial, (min_steps, command) in actions.items():
            t = state.trials.get(trial)
            if trial not in acted and t and t.job_id and steps_done(t.out) >= min_steps:
                subprocess.run([*command, t.job_id], check=True, capture_output=True)
                acted[trial] = t.job_id
        assert proc.poll() is None and time.monotonic() < deadline, f"acted on {acted} only"
        time.sleep(0.05)
    finish(proc, 200)

    state = journal.load()
    assert state.ended and len(state.finished) == 5
    assert [t.trial for t in state.finished if t.status == "failed"] == [2]
    assert "CANCELLED" in state.trials[2].reason
    reference = state.trials[3].value  # uninterrupted, as trial 4 (started once trial 2 had failed)
    client = MlflowClient(uri(tmp_path))
    for trial in (0, 1):
        t = state.trials[trial]
        assert [e["job_id"] for e in events(journal, "submitted") if e["trial"] == trial] == [acted[trial]]
        assert sacct_history(t.job_id) == ["REQUEUED", "COMPLETED"], (trial, t.job_id)
        result = json.loads((Path(t.out) / "result.json").read_text())
        assert 0 < result["resumed_from_step"] < steps, "the requeued job did not continue from a checkpoint"
        assert t.value == pytest.approx(reference, rel=1e-5)
        curve = client.get_metric_history(t.run_id, "train_loss")
        assert sorted(m.step for m in curve) == list(range(1, steps + 1)), "the curve is incomplete or doubled"
    assert state.trials[4].value == pytest.approx(reference, rel=1e-5)
    runs = child_runs(client, state, "interrupts")
    assert sorted(r.info.run_id for r in runs) == sorted(t.run_id for t in state.trials.values())
    assert_sacct_agrees_with_mlflow(client, state)


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], capture_output=True, text=True).stdout.split()[0]


def _kill_processes_of(job_id: str) -> None:
    """SIGKILL the job's processes (not its slurmstepd), found by SLURM_JOB_ID in their environment."""
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            if f"SLURM_JOB_ID={job_id}".encode() in env and (proc / "comm").read_text().strip() != "slurmstepd":
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _back_in_service(node: str) -> bool:
    if _node_state(node).rstrip("*~#") in ("idle", "mixed", "allocated", "completing"):
        return True
    subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
    return False


@pytest.mark.slow
def test_a_job_whose_node_fails_is_retried_per_policy(slurm_cluster, tiny_model_dir, tmp_path):
    """scontrol sets the node DOWN under a running job and the job's processes are killed (the node died):
    SLURM ends it NODE_FAIL (and would requeue it); the study cancels that copy, resubmits the trial
    (retries.on: [node_fail]) and the retry resumes from the checkpoint. (SLURM leaves the processes of a
    DOWN node alone: without the kill they would run on, as on a node cut off by the network; a retry then
    waits for them through the trial folder's lock, jobs/entry.py.)"""
    config = study_yaml(tmp_path, study="nodefail", algo="random", budget=2, parallel=1, executor="slurm",
                        poll_s=0.2, space=SAME_TRAINING, resources=GPU_JOB,
                        retries={"max_retries": 1, "on": ["node_fail"]},
                        trial={"max_steps": 60, "log_every": 1, "checkpoint_every": 10,
                               "data": {"total_rows": 300}})
    proc = orchestrator(tmp_path, "--config", config)
    journal = Journal(tmp_path / "runs" / "nodefail" / "journal.jsonl")
    first = wait_until(lambda: (t := journal.load().trials.get(0)) and t.job_id and steps_done(t.out) >= 12 and t,
                       90, "trial 0 past its first checkpoint", proc)
    node = sacct("-X", "-j", first.job_id, "-o", "NodeList")[0][0]
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=lora-hpo-test"], check=True)
        _kill_processes_of(first.job_id)
        wait_until(lambda: "NODE_FAIL" in sacct_history(first.job_id), 20, "NODE_FAIL in accounting")
    finally:  # ReturnToService=2 brings it back by itself; a copy started beside the old process drains it
        wait_until(lambda: _back_in_service(node), 30, "the node back in service")
    try:
        finish(proc, 150)
    finally:
        wait_until(lambda: _back_in_service(node), 30, "the node back in service")

    state = journal.load()
    assert len(state.finished) == 2 and all(t.status == "ok" for t in state.finished), \
        [(t.trial, t.reason) for t in state.finished]
    submissions = [e for e in events(journal, "submitted") if e["trial"] == 0]
    assert [e["attempt"] for e in submissions] == [0, 1], submissions
    assert submissions[0]["job_id"] == first.job_id != submissions[1]["job_id"]
    assert sacct_state(first.job_id) in ("CANCELLED", "NODE_FAIL"), "SLURM's requeued copy was left to run"
    t = state.trials[0]
    assert 0 < json.loads((Path(t.out) / "result.json").read_text())["resumed_from_step"] < 60
    assert t.value == pytest.approx(state.trials[1].value, rel=1e-5)
    run = MlflowClient(uri(tmp_path)).get_run(t.run_id)
    assert run.info.status == "FINISHED" and "NODE_FAIL" in run.data.tags["retry_1"]
    assert run.data.tags["slurm_job_id"] == submissions[1]["job_id"]


# --------------------------------------------------------------------------- the login node dies
def test_kill_9_of_the_orchestrator_then_resume_reattaches_the_slurm_jobs(slurm_cluster, tmp_path):
    study = f"crashy-{uuid.uuid4().hex[:8]}"  # the name sacct counts jobs by
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"LORA_HPO_TEST_MARKS": str(marks), "LORA_HPO_TEST_SLEEP": "4"}
    proc = orchestrator(tmp_path, "--algo", "tpe", "--study", study, "--budget", "6", "--parallel", "3",
                        "--executor", "slurm", "--objective", "tests.objectives:slow_landscape", "--poll", "0.3",
                        env=env)
    journal = Journal(tmp_path / "runs" / study / "journal.jsonl")
    kill_when(proc, lambda: (s := journal.load()).finished and any(t.job_id for t in s.running), 90,
              "a finished trial and a running job")
    before = journal.load()
    running = {t.trial: t.job_id for t in before.running if t.job_id}
    assert running and not before.ended
    (tmp_path / "runs" / study / "code" / "SENTINEL").write_text("the snapshot of the first start")

    finish(orchestrator(tmp_path, "--study", study, "--resume", env=env), 150)
    after = journal.load()
    assert after.ended and len(after.finished) == 6 and all(t.status == "ok" for t in after.finished)
    for trial, job_id in running.items():
        assert after.trials[trial].job_id == job_id, "a running job was resubmitted instead of re-attached"
    assert len(list(marks.iterdir())) == 6, "an evaluation was lost or ran twice"
    jobs = {row[0]: row[1] for row in sacct("-X", "-S", "now-3hours", f"--name={study}", "-o", "JobID,State")}
    assert sorted(jobs) == sorted(t.job_id for t in after.trials.values()), "sacct knows other jobs than the trials'"
    assert set(jobs.values()) == {"COMPLETED"}, jobs
    assert (tmp_path / "runs" / study / "code" / "SENTINEL").exists(), "--resume replaced the code snapshot"


# --------------------------------------------------------------------------- code pinned per study
PROBE = "import os\nimport time\n\n\ndef value(point):\n    time.sleep(float(os.environ.get('PROBE_SLEEP', 0)))\n" \
        "    return {value}\n"


@pytest.mark.parametrize("executor", ["local", "slurm"])
def test_jobs_run_the_code_the_study_started_with(request, tmp_path, executor):
    """A copy of the checkout runs a study; its objective module changes mid-study; later jobs still run the
    original (from <study>/code), where jobs importing from the checkout would return the new value."""
    if executor == "slurm":
        request.getfixturevalue("slurm_cluster")
    checkout = tmp_path / "checkout"
    for name in ("orchestrator", "jobs", "slurm", "evaluation"):
        shutil.copytree(REPO / name, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    probe = checkout / "jobs" / "pin_probe.py"
    probe.write_text(PROBE.format(value=1.0))
    proc = orchestrator(tmp_path, "--algo", "random", "--study", "pinned", "--budget", "4", "--parallel", "2",
                        "--executor", executor, "--objective", "jobs.pin_probe:value", "--poll", "0.2",
                        env={"PROBE_SLEEP": "1"}, cwd=checkout)
    journal = Journal(tmp_path / "runs" / "pinned" / "journal.jsonl")
    wait_until(lambda: journal.exists() and len(events(journal, "submitted")) >= 2, 60, "two submissions", proc)
    probe.write_text(PROBE.format(value=22.0))  # a different size too: no stale .pyc can hide a re-import
    changed = time.time()
    finish(proc, 120)

    state = journal.load()
    assert len([e for e in events(journal, "submitted") if e["time"] > changed]) >= 2, "no job started after"
    assert [t.value for t in state.finished] == [1.0] * 4, [(t.trial, t.value, t.reason) for t in state.finished]
    code = tmp_path / "runs" / "pinned" / "code"
    assert "return 1.0" in (code / "jobs" / "pin_probe.py").read_text()
    tags = MlflowClient(uri(tmp_path)).get_run(state.parent_run_id).data.tags
    assert tags["code_snapshot"] == str(code.resolve()) and "git_sha" in tags
