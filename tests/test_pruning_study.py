"""Pruning in a real study: tiny fine-tunes on the local executor, the ASHA pruner, MLflow, kill -9 + resume.

    .venv/bin/python -m pytest -q tests/test_pruning_study.py

Four trials, one at a time (random search, seed 0 draws: lr 1e-3, 1e-6, 1e-6, 1e-3): the two at lr 1e-6 learn
nothing and must be stopped at the first rung, the others must run to the end. Steps last at least 0.4 s
(LORA_HPO_MIN_STEP_S), so a job cannot finish in the time the orchestrator takes to decide and cancel it.
"""
import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.study.journal import Journal
from orchestrator.study.journal import load_study

from .conftest import REPO, kill_when

pytestmark = pytest.mark.slow
SPACE = {"r": {"choice": [4, 8], "default": 8}, "lr": {"choice": [1e-6, 1e-3], "default": 1e-3},
         "alpha": {"fixed": 16}, "dropout": {"fixed": 0.05}}


def study(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "study": name, "algo": "random", "seed": 0, "budget": 4, "parallel": 1, "executor": "local", "poll_s": 0.2,
        "space": SPACE, "pruner": {"kind": "asha", "rungs": [0.25], "reduction_factor": 2, "margin": 0.3},
        "trial": {"max_steps": 24, "log_every": 1, "eval_subset": 40, "data": {"total_rows": 300}}}))
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "--config", str(path), "--workdir",
                             str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"],
                            cwd=REPO, env={**os.environ, "LORA_HPO_MIN_STEP_S": "0.4"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_hopeless_trials_are_pruned_and_the_good_ones_are_not(tiny_model_dir, tmp_path):
    proc = study(tmp_path, "pruned")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    state = load_study(tmp_path / "runs" / "pruned")
    by_lr = {lr: [t for t in state.finished if t.point["lr"] == lr] for lr in (1e-6, 1e-3)}
    assert [t.status for t in by_lr[1e-6]] == ["pruned", "pruned"], [(t.trial, t.status) for t in state.finished]
    assert [t.status for t in by_lr[1e-3]] == ["ok", "ok"]
    for t in by_lr[1e-6]:
        assert t.pruned["fraction"] == 0.25 and t.summary["pruned_fraction"] == 0.25
        assert "pruned at 25% of training" in t.reason and f"trial {t.trial}: pruned at 25%" in out
    best = min(by_lr[1e-3], key=lambda t: t.value)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert client.get_model_version_by_alias("pruned-adapter", "champion").run_id == best.run_id
    for t in by_lr[1e-6]:
        run = client.get_run(t.run_id)
        assert run.info.status == "KILLED" and run.data.tags["status"] == "pruned"
        assert run.data.metrics["pruned_at_fraction"] == 0.25 and "val_loss_when_pruned" in run.data.metrics
    history = (tmp_path / "runs" / "pruned" / "plots" / "history.html").read_text()
    assert "pruned (2)" in history


def test_kill_9_during_pruning_then_resume_keeps_the_decision(tiny_model_dir, tmp_path):
    proc = study(tmp_path, "crashy")
    journal = Journal(tmp_path / "runs" / "crashy" / "journal.jsonl")

    def decided_not_settled():
        state = journal.load() if journal.exists() else None
        return state and any(t.pruned and t.status is None for t in state.trials.values())

    kill_when(proc, decided_not_settled, 600, "a pruning decision whose trial is not settled yet")
    pruned = [t.trial for t in journal.load().trials.values() if t.pruned]
    resumed = subprocess.run([sys.executable, "-m", "orchestrator", "--study", "crashy", "--resume", "--workdir",
                              str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db"],
                             cwd=REPO, env={**os.environ, "LORA_HPO_MIN_STEP_S": "0.4"}, capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    state = load_study(tmp_path / "runs" / "crashy")
    for trial in pruned:
        assert state.trials[trial].status == "pruned", "a pruned trial was resurrected"
    decisions = [r for r in journal.records() if r["event"] == "prune"]
    assert len(decisions) == len({r["trial"] for r in decisions}), "a trial was pruned twice"
    assert len(state.finished) == 4 and sum(t.status == "pruned" for t in state.finished) == 2
