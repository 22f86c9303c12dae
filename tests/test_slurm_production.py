"""Studies on the dev cluster configured as production sites are: KillWait 30, the scheduler's default delays,
credential expiry 120 s, DefMemPerCPU, partition MaxTime, memory enforcement, partition-priority preemption.

    .venv/bin/python -m pytest -q -m slurm tests/test_slurm_production.py      # several minutes

Each test interrupts real fine-tunes the way a site does and checks that the trial keeps its identity and its
result, that journal, MLflow and the trial folder agree, and that no job runs after its trial was settled.
Fine-tune steps last at least LORA_HPO_MIN_STEP_S seconds so that a job cannot finish before the event the
test waits for; the tests wait for events (a stop record, a state in sacct), never for a fixed time. They
print what recovery costs here (the figures in the README and slurm/README.md come from these lines).
"""
import json
import os
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.contract import read_attempts
from orchestrator.study.journal import Journal
from orchestrator.study.journal import load_study

from .slurm_fixture import (events, finish, orchestrator, sacct, sacct_history, slurm_cluster,  # noqa: F401
                            slurm_production, steps_done, study_yaml, uri, wait_until)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# One trial holds the node's four (fake) GPUs, so that a job in `urgent` asking for them must preempt it.
WHOLE_NODE = {"gpus_per_node": 4, "tasks_per_node": 1, "timeout_min": 10}
SAME_TRAINING = {"keep_checkpoints": {"choice": [1, 2, 3, 4, 5, 6, 7, 8], "default": 1},
                 "r": {"fixed": 8}, "alpha": {"fixed": 16}, "dropout": {"fixed": 0.1}, "lr": {"fixed": 1e-3}}
TRIAL = {"max_steps": 40, "log_every": 1, "checkpoint_every": 0, "data": {"total_rows": 300}}
SLOW_STEPS = {"LORA_HPO_MIN_STEP_S": "0.3"}


def stop_record(out, job_id) -> dict | None:
    return next((r for r in read_attempts(out) if r.get("event") == "stop" and r.get("job_id") == job_id), None)


def running_trial(journal, trial, steps, proc, timeout_s=180):
    """Wait until the trial's job has trained `steps` steps; returns (its state, its job id)."""
    t = wait_until(lambda: (t := journal.load().trials.get(trial)) and t.job.job_id and steps_done(t.out) >= steps and t,
                   timeout_s, f"trial {trial} at step {steps}", proc)
    return t, t.job.job_id


def sacct_times(job_id) -> list[tuple[str, datetime | None, datetime | None]]:
    rows = sacct("-X", "-D", "-j", job_id, "-o", "State,Start,End")
    parse = lambda v: datetime.fromisoformat(v) if v[:1].isdigit() else None  # noqa: E731
    return [(r[0].split(" ")[0], parse(r[1]), parse(r[2])) for r in rows]


def assert_one_truth(state, client):
    """Journal, MLflow and the trial folders agree on every trial."""
    for t in state.trials.values():
        run = client.get_run(t.run_id)
        result = json.loads((Path(t.out) / "result.json").read_text()) if (Path(t.out) / "result.json").exists() \
            else None
        if t.status == "ok":
            assert run.info.status == "FINISHED" and result and result["status"] == "ok", (t.trial, result)
            assert (Path(t.out) / "adapter").is_dir()
        else:
            assert run.info.status == "FAILED" and not (result and result.get("status") == "ok"), (t.trial, result)


def reference_and_interrupted(tmp_path, name, resources, retries=None, budget=2):
    """A study of `budget` identical trials; the first is the one the test interrupts."""
    config = study_yaml(tmp_path, study=name, algo="random", budget=budget, parallel=1, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, resources=resources, trial=TRIAL,
                        **({"retries": retries} if retries else {}))
    proc = orchestrator(tmp_path, "--config", config, env=SLOW_STEPS)
    return proc, Journal(tmp_path / "runs" / name / "journal.jsonl")


@pytest.mark.parametrize("partition, mode", [("gpu", "REQUEUE"), ("scavenger", "CANCEL")])
def test_a_preempted_trial_goes_on_from_its_checkpoint(slurm_production, tiny_model_dir, tmp_path, partition, mode):
    """An `urgent` job takes the node: the trial's job is preempted (requeued or cancelled by SLURM), saved its
    checkpoint on SIGTERM, and the trial continues in a fresh job once the node is free."""
    proc, journal = reference_and_interrupted(tmp_path, f"preempt-{mode.lower()}",
                                              {**WHOLE_NODE, "partition": partition})
    t, first = running_trial(journal, 0, 5, proc)
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--gres=gpu:4", "-t", "5",
                             "-o", str(tmp_path / "urgent-%j.out"), "--wrap", "sleep 8"],
                            capture_output=True, text=True, check=True).stdout.strip()
    stop = wait_until(lambda: stop_record(t.out, first), 60, "the preempted job's stop record", proc)
    finish(proc, 400)

    state = load_study(journal.path.parent)
    t = state.trials[0]
    assert t.status == "ok" and t.job.job_id != first, (t.reason, t.job.job_id)
    [retry] = [e for e in events(journal, "retry") if e["key"] == "0"]
    assert retry["kind"] == "preempted" and retry["follow"] == (mode == "REQUEUE"), retry
    assert stop["signal"] == "SIGTERM" and stop["saved"]
    result = json.loads((Path(t.out) / "result.json").read_text())
    assert result["resumed_from_step"] == stop["step"] > 0
    assert t.value == pytest.approx(state.trials[1].value, rel=1e-5)
    history = sacct_history(first)
    assert history[0] == "PREEMPTED" and "RUNNING" not in history[1:], f"the preempted job ran again: {history}"
    client = MlflowClient(uri(tmp_path))
    tags = client.get_run(t.run_id).data.tags
    assert tags["slurm_state"] == "COMPLETED" and tags["slurm_job_id"] == t.job.job_id
    attempts = json.loads(tags["attempt_history"])
    assert [a["job_id"] for a in attempts] == [first, t.job.job_id] and attempts[0]["states"][0] == "PREEMPTED"
    assert_one_truth(state, client)
    ended = sacct_times(first)[0][2]
    started = sacct_times(t.job.job_id)[0][1]
    urgent_end = sacct_times(urgent)[0][2]
    print(f"\n[recovery] preemption ({mode}): preempted at {ended:%H:%M:%S}, urgent job ended {urgent_end:%H:%M:%S}, "
          f"trial running again {(started - ended).total_seconds():.0f} s after its preemption "
          f"({(started - urgent_end).total_seconds():.0f} s after the node was free)")


def test_requeue_and_requeuehold_are_followed_and_the_job_stops_well_inside_killwait(slurm_production,
                                                                                    tiny_model_dir, tmp_path):
    proc, journal = reference_and_interrupted(tmp_path, "requeues", {**WHOLE_NODE, "gpus_per_node": 1}, budget=3)
    stops = {}
    for trial, command in ((0, ["scontrol", "requeue"]), (1, ["scontrol", "requeuehold"])):
        t, job_id = running_trial(journal, trial, 4, proc)
        sent = time.time()
        subprocess.run([*command, job_id], check=True, capture_output=True)
        stop = wait_until(lambda: stop_record(t.out, job_id), 60, f"trial {trial}'s stop record", proc)
        stops[trial] = (job_id, stop, stop["time"] - sent)
    finish(proc, 400)

    state = load_study(journal.path.parent)
    assert all(t.status == "ok" for t in state.finished) and len(state.finished) == 3
    for trial, (job_id, stop, latency) in stops.items():
        t = state.trials[trial]
        assert stop["signal"] == "SIGTERM" and stop["saved"] and latency < 15, (trial, stop, latency)  # KillWait: 30
        [retry] = [e for e in events(journal, "retry") if e["key"] == str(trial)]
        assert retry["kind"] == "requeued" and retry["follow"] and t.job.job_id != job_id
        history = sacct_history(job_id)
        assert history[0] == "REQUEUED" and history[-1] == "CANCELLED" and "RUNNING" not in history[1:], history
        assert json.loads((Path(t.out) / "result.json").read_text())["resumed_from_step"] == stop["step"]
        assert t.value == pytest.approx(state.trials[2].value, rel=1e-5)
        print(f"\n[recovery] scontrol {'requeue' if trial == 0 else 'requeuehold'}: the job stopped "
              f"{latency:.1f} s after the command (KillWait 30 s); running again "
              f"{(sacct_times(t.job.job_id)[0][1] - sacct_times(job_id)[0][2]).total_seconds():.0f} s after it stopped")
    assert_one_truth(state, MlflowClient(uri(tmp_path)))


def test_a_time_limit_shorter_than_the_training_is_finished_across_attempts(slurm_production, tiny_model_dir,
                                                                          tmp_path):
    """A 1-minute limit for about 1.5 minutes of training: each attempt saves at USR2 (sent up to a minute
    early) and the next resumes there, repeating no step; the attempts are bounded by retries.max_retries."""
    config = study_yaml(tmp_path, study="limits", algo="random", budget=1, parallel=1, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, trial={**TRIAL, "max_steps": 120},
                        resources={"timeout_min": 1, "signal_delay_s": 15},
                        retries={"on": ["timeout"], "max_retries": 8})
    proc = orchestrator(tmp_path, "--config", config, env={"LORA_HPO_MIN_STEP_S": "0.4"})
    t0 = time.time()
    finish(proc, 900)
    wall = time.time() - t0
    state = load_study(tmp_path / "runs" / "limits")
    t = state.trials[0]
    assert t.status == "ok", t.reason
    stops = [r for r in read_attempts(t.out) if r.get("event") == "stop"]
    starts = [r for r in read_attempts(t.out) if r.get("event") == "start"]
    assert len(stops) >= 1 and all(s["signal"] == "SIGUSR2" and s["saved"] for s in stops), stops
    assert len(starts) == len(stops) + 1 <= 9
    retries = events(Journal(tmp_path / "runs" / "limits" / "journal.jsonl"), "retry")
    assert [r["kind"] for r in retries] == ["timeout"] * len(stops)
    steps = [json.loads(line)["step"] for line in (Path(t.out) / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 121)), "a step was repeated or lost across attempts"
    print(f"\n[recovery] time limit 1 min, 120 steps of >= 0.4 s: {len(starts)} attempts, {wall:.0f} s of wall time, "
          f"stops at steps {[s['step'] for s in stops]}")


def test_a_job_over_its_memory_is_a_failed_trial_that_says_so(slurm_production, tmp_path):
    proc = orchestrator(tmp_path, "--study", "memory", "--algo", "random", "--budget", "1", "--executor", "slurm",
                        "--objective", "tests.objectives:eats_memory", "--poll", "0.3")
    finish_code = proc.wait(timeout=300)
    output = proc.stdout.read()
    state = load_study(tmp_path / "runs" / "memory")
    t = state.trials[0]
    assert finish_code == 1 and t.status == "failed", output
    assert "out of memory" in t.reason and "resources.mem_gb" in t.reason, t.reason


def test_pending_trials_show_why_they_wait_and_status_asks_slurm(slurm_production, tmp_path):
    """While SLURM holds the trial's job, the study's line and `status` say why; once it runs, `status` says for
    how long, from SLURM's start time, in any time zone (sacct prints local times)."""
    gate = tmp_path / "gate"
    blocker = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "--gres=gpu:4", "-t", "5", "-o",
                              str(tmp_path / "blocker-%j.out"), "--wrap", "sleep 300"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:   # the gate opens whatever happens: no job of this test outlives it
        try:
            wait_until(lambda: [["RUNNING"]] == sacct("-X", "-j", blocker, "-o", "State")[-1:], 60,
                       "the blocker running")
            launched = time.time()
            proc = orchestrator(tmp_path, "--study", "waits", "--algo", "random", "--budget", "1", "--executor",
                                "slurm", "--objective", "tests.objectives:waits_for_file", "--poll", "0.3",
                                "--config", study_yaml(tmp_path, study="waits", resources={"gpus_per_node": 2}),
                                env={"LORA_HPO_TEST_GATE": str(gate)})
            journal = Journal(tmp_path / "runs" / "waits" / "journal.jsonl")
            wait_until(lambda: journal.exists() and any(t.job.job_id for t in journal.load().running), 60,
                       "submission", proc)
            shown = wait_until(lambda: "pending (Resources)" in (out := status("waits", tmp_path)) and out, 60,
                               "status showing the pending reason")
            assert "running 0, pending 1" in shown, shown
            # `status` asks SLURM itself; the study learns the reason on its own next poll: wait for that too
            progress = tmp_path / "runs" / "waits" / "progress.txt"
            wait_until(lambda: progress.exists() and "pending (Resources)" in progress.read_text(), 60,
                       "the study's own line showing the pending reason", proc)
        finally:
            subprocess.run(["scancel", blocker])
        job_id = journal.load().running[0].job.job_id
        wait_until(lambda: (running_for(status("waits", tmp_path), job_id) or 0) >= 2, 120,
                   "status saying the job has run for 2 s", proc)
        out = status("waits", tmp_path, tz="America/New_York")   # 5 h off UTC: a clock read in the wrong zone
        assert 2 <= running_for(out, job_id) <= time.time() - launched + 1, (time.time() - launched, out)
    finally:
        gate.touch()
    output = finish(proc, 120)
    assert "1 pending (Resources)" in output, output


def status(study, tmp_path, tz="UTC") -> str:
    return subprocess.run([*orchestrator_cmd(), "status", "--study", study, "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env={**os.environ, "TZ": tz}).stdout


def running_for(status_text, job_id) -> int | None:
    """Seconds in `status`'s "running for H:MM:SS (job ID" of that job; None if it does not say so."""
    found = re.search(rf"running for (\d+):(\d\d):(\d\d) \(job {job_id}\b", status_text)
    return None if found is None else 3600 * int(found[1]) + 60 * int(found[2]) + int(found[3])


def orchestrator_cmd():
    import sys
    return [sys.executable, "-m", "orchestrator"]
