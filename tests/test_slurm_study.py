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
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.study.journal import Journal
from orchestrator.study.loop import run_study
from orchestrator.study.journal import load_study

from .slurm_fixture import (REPO, events, finish, orchestrator, sacct, sacct_history, sacct_state,  # noqa: F401
                            slurm_cluster, steps_done, study_yaml, uri, wait_until)
from .conftest import kill_when

pytestmark = pytest.mark.slurm

GPU_JOB = {"partition": "gpu", "gpus_per_node": 1, "timeout_min": 10}
# Every trial trains identically: the one searched value only says how many checkpoints to keep.
SAME_TRAINING = {"keep_checkpoints": {"choice": [1, 2, 3, 4, 5, 6, 7, 8], "default": 1},
                 "r": {"fixed": 8}, "alpha": {"fixed": 16}, "dropout": {"fixed": 0.1}, "lr": {"fixed": 1e-3}}
MLFLOW_STATUS = {"COMPLETED": "FINISHED", "CANCELLED": "FAILED", "FAILED": "FAILED", "TIMEOUT": "FAILED"}


def child_runs(client, state, study):
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{state.parent_run_id}'",
                              max_results=1000)


def assert_sacct_agrees_with_mlflow(client, state):
    for t in state.trials.values():
        run = client.get_run(t.run_id)
        assert run.data.tags["slurm_job_id"] == t.job.job_id, (t.trial, run.data.tags)
        job_state = sacct_state(t.job.job_id)
        assert MLFLOW_STATUS.get(job_state) == run.info.status, (t.trial, t.job.job_id, job_state, run.info.status)


# --------------------------------------------------------------------------- dispatch
def test_tiny_study_runs_on_slurm_and_accounting_agrees_with_mlflow(slurm_cluster, tiny_model_dir, tmp_path):
    cfg = load_config(None, study="slurm-tiny", algo="tpe", budget=3, parallel=2, executor="slurm", poll_s=0.3,
                      seed=1, workdir=str(tmp_path / "runs"), tracking_uri=uri(tmp_path),
                      trial={"max_steps": 10, "data": {"total_rows": 300}}, resources=GPU_JOB)
    state = run_study(cfg, out=open(os.devnull, "w"))
    assert len(state.finished) == 3 and all(t.status == "ok" for t in state.finished), \
        [(t.trial, t.reason) for t in state.finished]
    client = MlflowClient(cfg.tracking())
    node = sacct("-X", "-j", state.trials[0].job.job_id, "-o", "NodeList")[0][0]
    runs = child_runs(client, state, cfg.study)
    assert len(runs) == 3
    for run in runs:
        t = state.trials[int(run.data.tags["trial"])]
        assert run.data.tags["slurm_node"] == node and run.data.tags["executor"] == "slurm"
        assert run.data.metrics["val_loss"] == pytest.approx(t.value)
    assert_sacct_agrees_with_mlflow(client, state)
    # TPE's first two asks filled both slots at once: one job array, journaled before and after submission.
    first = [state.trials[i].job.job_id for i in (0, 1)]
    assert first[0].split("_")[0] == first[1].split("_")[0] and {j.split("_")[1] for j in first} == {"0", "1"}
    journal = Journal(cfg.folder / "journal.jsonl")
    order = [e["event"] for e in events(journal) if e["event"] in ("trial", "dispatch", "submitted")]
    assert order[:4] == ["trial", "trial", "dispatch", "submitted"], order
    dispatch, submitted = events(journal, "dispatch")[0], events(journal, "submitted")[0]
    assert dispatch["keys"] == ["0", "1"] and submitted["jobs"] == {"0": first[0], "1": first[1]}
    assert sacct("-X", "-j", first[0], "-o", "JobName")[0][0] == f"slurm-tiny.{dispatch['batch']}"
    parent = client.get_run(state.parent_run_id)
    assert parent.data.tags["code_snapshot"] == str((cfg.folder / "code").resolve())
    assert parent.data.tags["git_sha"] and (cfg.folder / "code" / "jobs" / "finetune.py").exists()


# --------------------------------------------------------------------------- interruptions
@pytest.mark.slow
def test_requeue_time_limit_and_cancel_keep_the_trial_and_its_result(slurm_cluster, tiny_model_dir, tmp_path):
    """Four identical fine-tunes as one array: one requeued (scontrol requeue: SIGTERM, then SIGKILL), one
    sent the time-limit signal (USR2, what --signal sends before the limit), one cancelled, one untouched.
    A signalled job saves its checkpoint and stops at once; the study continues the requeued and the timed-out
    trials in fresh jobs that resume from those checkpoints (retries.on has timeout), and the cancelled one
    fails. Steps last at least 0.2 s (LORA_HPO_MIN_STEP_S), so no job can finish before its signal lands."""
    steps = 40
    config = study_yaml(tmp_path, study="interrupts", algo="random", budget=5, parallel=4, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, resources=GPU_JOB,
                        retries={"max_retries": 2, "on": ["submission", "node_fail", "preempted", "timeout"]},
                        trial={"max_steps": steps, "log_every": 1, "checkpoint_every": 0,
                               "data": {"total_rows": 300}})
    proc = orchestrator(tmp_path, "--config", config, env={"LORA_HPO_MIN_STEP_S": "0.2"})
    journal = Journal(tmp_path / "runs" / "interrupts" / "journal.jsonl")
    actions = {0: (3, ["scontrol", "requeue"], "SIGTERM"), 1: (3, ["scancel", "--signal=USR2"], "SIGUSR2"),
               2: (1, ["scancel"], "SIGTERM")}
    acted = {}
    deadline = time.monotonic() + 180
    while len(acted) < len(actions):
        state = journal.load()
        for trial, (min_steps, command, sig) in actions.items():
            t = state.trials.get(trial)
            if trial not in acted and t and t.job.job_id and steps_done(t.out) >= min_steps:
                acted[trial] = t.job.job_id
            if trial in acted and not stopped(t.out, acted[trial]):
                # scancel may answer "Job can not be altered now, try again later" though the signal landed:
                # the stop record in the trial folder is what says the job got it, so send until it shows
                subprocess.run([*command, acted[trial]], capture_output=True)
        assert proc.poll() is None and time.monotonic() < deadline, f"acted on {acted} only"
        time.sleep(0.2)
    finish(proc, 300)

    state = load_study(journal.path.parent)
    assert state.ended and len(state.finished) == 5
    assert [t.trial for t in state.finished if t.status == "failed"] == [2]
    assert "CANCELLED" in state.trials[2].reason and "SIGTERM" in state.trials[2].reason
    reference = state.trials[3].value  # uninterrupted, as trial 4 (started once trial 2 had failed)
    client = MlflowClient(uri(tmp_path))
    for trial, kind, signal_name in ((0, "requeued", "SIGTERM"), (1, "timeout", "SIGUSR2")):
        t = state.trials[trial]
        [retry] = [e for e in events(journal, "retry") if e["key"] == str(trial)]
        assert retry["kind"] == kind and retry["job_id"] == acted[trial] and t.job.job_id != acted[trial]
        stop = stopped(t.out, acted[trial])
        assert stop["signal"] == signal_name and stop["saved"], stop
        result = json.loads((Path(t.out) / "result.json").read_text())
        assert result["resumed_from_step"] == stop["step"] > 0, "the next attempt did not start where it stopped"
        assert t.value == pytest.approx(reference, rel=1e-5)
        curve = client.get_metric_history(t.run_id, "train_loss")
        assert sorted(m.step for m in curve) == list(range(1, steps + 1)), "the curve is incomplete or doubled"
        assert "RUNNING" not in sacct_history(acted[trial])[1:], "the signalled job ran again"
        assert json.loads(client.get_run(t.run_id).data.tags["attempt_history"])[0]["job_id"] == acted[trial]
    assert sacct_history(acted[0])[-1] == "CANCELLED", "SLURM's requeued copy was not cancelled"
    assert state.trials[4].value == pytest.approx(reference, rel=1e-5)
    runs = child_runs(client, state, "interrupts")
    assert sorted(r.info.run_id for r in runs) == sorted(t.run_id for t in state.trials.values())
    assert_sacct_agrees_with_mlflow(client, state)


def stopped(out, job_id) -> dict | None:
    """The stop record a job wrote in its trial folder when a signal stopped it (jobs/entry.py)."""
    from jobs.contract import read_attempts
    return next((r for r in read_attempts(out) if r.get("event") == "stop" and r.get("job_id") == job_id), None)


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
    first = wait_until(lambda: (t := journal.load().trials.get(0)) and t.job.job_id and steps_done(t.out) >= 12 and t,
                       90, "trial 0 past its first checkpoint", proc)
    node = sacct("-X", "-j", first.job.job_id, "-o", "NodeList")[0][0]
    try:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=down", "reason=lora-hpo-test"], check=True)
        _kill_processes_of(first.job.job_id)
        wait_until(lambda: "NODE_FAIL" in sacct_history(first.job.job_id), 20, "NODE_FAIL in accounting")
    finally:  # ReturnToService=2 brings it back by itself; a copy started beside the old process drains it
        wait_until(lambda: _back_in_service(node), 30, "the node back in service")
    try:
        finish(proc, 150)
    finally:
        wait_until(lambda: _back_in_service(node), 30, "the node back in service")

    state = load_study(journal.path.parent)
    assert len(state.finished) == 2 and all(t.status == "ok" for t in state.finished), \
        [(t.trial, t.reason) for t in state.finished]
    dispatches = [e["attempts"]["0"] for e in events(journal, "dispatch") if "0" in e["keys"]]
    assert dispatches == [0, 1], dispatches
    jobs = [e["jobs"]["0"] for e in events(journal, "submitted") if "0" in e["jobs"]]
    assert jobs[0] == first.job.job_id != jobs[1]
    [retry] = [e for e in events(journal, "retry") if e["key"] == "0"]
    assert retry["kind"] == "node_fail" and not retry["follow"]
    assert sacct_state(first.job.job_id) in ("CANCELLED", "NODE_FAIL"), "SLURM's requeued copy was left to run"
    t = state.trials[0]
    assert 0 < json.loads((Path(t.out) / "result.json").read_text())["resumed_from_step"] < 60
    assert t.value == pytest.approx(state.trials[1].value, rel=1e-5)
    run = MlflowClient(uri(tmp_path)).get_run(t.run_id)
    assert run.info.status == "FINISHED" and "NODE_FAIL" in run.data.tags["retry_1"]
    assert run.data.tags["slurm_job_id"] == jobs[1]


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
    kill_when(proc, lambda: (s := journal.load()).finished and any(t.job.job_id for t in s.running), 90,
              "a finished trial and a running job")
    before = journal.load()
    running = {t.trial: t.job.job_id for t in before.running if t.job.job_id}
    assert running and not before.ended
    (tmp_path / "runs" / study / "code" / "SENTINEL").write_text("the snapshot of the first start")

    finish(orchestrator(tmp_path, "--study", study, "--resume", env=env), 150)
    after = journal.load()
    assert after.ended and len(after.finished) == 6 and all(t.status == "ok" for t in after.finished)
    for trial, job_id in running.items():
        assert after.trials[trial].job.job_id == job_id, "a running job was resubmitted instead of re-attached"
    assert len(list(marks.iterdir())) == 6, "an evaluation was lost or ran twice"
    jobs = {row[0]: row[2] for row in sacct("-X", "-S", "now-3hours", "-o", "JobID,JobName%200,State")
            if row[1].startswith(f"{study}.")}  # jobs are named <study>.<dispatch batch>
    assert sorted(jobs) == sorted(t.job.job_id for t in after.trials.values()), "sacct knows other jobs than the trials'"
    assert set(jobs.values()) == {"COMPLETED"}, jobs
    assert (tmp_path / "runs" / study / "code" / "SENTINEL").exists(), "--resume replaced the code snapshot"


# --------------------------------------------------------------------------- code pinned per study
PROBE = "import os\nimport time\n\n\ndef value(point):\n    time.sleep(float(os.environ.get('PROBE_SLEEP', 0)))\n" \
        "    return {value}\n"



def test_a_crash_between_sbatch_and_submitits_pickle_resubmits_instead_of_adopting(slurm_cluster, tmp_path, monkeypatch):
    """The window CI hit (a kill -9 after sbatch returned, before submitit renamed its pickle to
    <id>_submitted.pkl): recovery found the job by its name, adopted it, and the job failed 60 s later for want of
    its pickle, a failed trial for a crash of the login node. Made here without a kill: submitit's rename raises,
    so sbatch has run and the pickle is where the kill left it. The next process's recover() cancels that job and
    leaves its task to be submitted again; a job whose pickle is there is still adopted."""
    import submitit.core.utils as submitit_utils

    from jobs.entry import ObjectiveTrial
    from slurm.backend import make_backend
    from slurm.dispatch import Task
    from slurm.executors import Resources

    point = {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-4}
    tasks = [Task(str(k), ObjectiveTrial(), ("tests.objectives:slow_landscape", point, None)) for k in range(2)]
    backend = make_backend("slurm", tmp_path / "submitit", Resources(timeout_min=5), job_name="t")
    name = f"t.{uuid.uuid4().hex[:8]}"
    [whole] = backend.submit(tasks[1:], name + "-ok")   # submitted as usual: its pickle is in place

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the orchestrator dies here")
    with monkeypatch.context() as m:
        m.setattr(submitit_utils.JobPaths, "move_temporary_file", killed)
        with pytest.raises(KeyboardInterrupt):
            backend.submit(tasks[:1], name)
    fresh = make_backend("slurm", tmp_path / "submitit", Resources(timeout_min=5), job_name="t")
    [orphan] = wait_until(lambda: [row[0] for row in sacct("-X", "-S", "now-1hour", "-o", "JobID,JobName%200")
                                   if row[1] == name], 30, "the orphan job in accounting")
    assert fresh.recover(name, tasks[:1]) == {}, "a job without its pickle was adopted"
    assert sacct_state(orphan, timeout_s=60) == "CANCELLED"
    assert fresh.recover(name + "-ok", tasks[1:]) == {"1": str(whole.job_id)}

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
    jobs_in = lambda evs: sum(len(e["jobs"]) for e in evs)  # noqa: E731 - a batch's jobs share one record
    wait_until(lambda: journal.exists() and jobs_in(events(journal, "submitted")) >= 2, 60, "two submissions", proc)
    probe.write_text(PROBE.format(value=22.0))  # a different size too: no stale .pyc can hide a re-import
    changed = time.time()
    finish(proc, 120)

    state = journal.load()
    assert jobs_in([e for e in events(journal, "submitted") if e["time"] > changed]) >= 2, "no job started after"
    assert [t.value for t in state.finished] == [1.0] * 4, [(t.trial, t.value, t.reason) for t in state.finished]
    code = tmp_path / "runs" / "pinned" / "code"
    assert "return 1.0" in (code / "jobs" / "pin_probe.py").read_text()
    tags = MlflowClient(uri(tmp_path)).get_run(load_study(journal.path.parent).parent_run_id).data.tags
    assert tags["code_snapshot"] == str(code.resolve()) and "git_sha" in tags
