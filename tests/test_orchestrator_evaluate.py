"""`python -m orchestrator evaluate` on a tiny real study: real adapters, local evaluation jobs, MLflow, journal.

    .venv/bin/python -m pytest tests/test_orchestrator_evaluate.py -q     # about a minute and a half
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.study.evaluate import load_evaluations
from orchestrator.study.journal import Journal
from orchestrator.study.loop import run_study

from .conftest import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    cfg = load_config(None, study="ev", algo="nomad", budget=3, parallel=2, executor="local", poll_s=0.5,
                      workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db", seed=1,
                      trial={"max_steps": 6, "log_every": 2, "data": {"total_rows": 300}},
                      space={"r": {"choice": [4, 8, 16], "default": 8}, "alpha": {"int": [8, 32], "default": 16},
                             "dropout": {"choice": [0, 0.05], "default": 0.05},
                             "lr": {"log": [3e-4, 2e-3], "default": 1e-3}})
    state = run_study(cfg, out=open(os.devnull, "w"))
    assert all(t.status == "ok" for t in state.finished) and len(state.finished) == 3
    return cfg, state, tmp


def evaluate_args(cfg, *extra):
    return ["evaluate", "--study", cfg.study, "--workdir", cfg.workdir, "--tracking-uri", cfg.tracking(),
            "--data-dir", str(FIXTURES), "--executor", "local", "--poll", "0.3", *extra]


def events(cfg, name):
    path = Path(cfg.workdir) / cfg.study / "evaluate.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == name]


def test_top_k_and_default_are_evaluated_tracked_and_not_redone(study, capsys):
    cfg, state, _ = study
    args = evaluate_args(cfg, "--top", "2", "--include-default", "--tasks", "mmlu,humaneval", "--limit", "2")
    assert main(args) == 0
    ranked = sorted(state.finished, key=lambda t: t.value)
    default = min(state.trials)  # NOMAD's first point is X0, the default point
    assert state.trials[default].point == {"r": 8, "alpha": 16, "dropout": 0.05, "lr": pytest.approx(1e-3)}
    expected = {t.trial for t in ranked[:2]} | {default}
    assert {r["trial"] for r in events(cfg, "evaluation")} == expected
    assert [r["status"] for r in events(cfg, "result")] == ["ok"] * len(expected)

    client = MlflowClient(cfg.tracking())
    for trial in expected:
        run = client.get_run(state.trials[trial].run_id)
        assert {"mmlu", "humaneval"} <= set(run.data.metrics), f"trial {trial} has no downstream metrics"
        assert 0 <= run.data.metrics["mmlu"] <= 1 and run.data.tags["eval_status"] == "ok"
        assert run.data.tags["eval_default"] == str(trial == default).lower()
        assert "eval/scores.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    skipped = ({t.trial for t in state.finished} - expected)
    for trial in skipped:
        assert "mmlu" not in client.get_run(state.trials[trial].run_id).data.metrics
    parent = client.get_run(state.parent_run_id)
    top = [client.get_run(state.trials[t.trial].run_id).data.metrics["mmlu"] for t in ranked[:2]]
    assert parent.data.metrics["top2_mean_mmlu"] == pytest.approx(sum(top) / 2)
    assert parent.data.metrics["default_mmlu"] == client.get_run(state.trials[default].run_id).data.metrics["mmlu"]
    assert {"eval/poster_table.md", "eval/poster_table.json"} <= {
        a.path for a in client.list_artifacts(state.parent_run_id, "eval")}
    assert "| default | 1 |" in capsys.readouterr().out

    # a rerun with the same settings submits nothing and journals no new evaluation
    n_lines = len((Path(cfg.workdir) / cfg.study / "evaluate.jsonl").read_text().splitlines())
    assert main(args) == 0
    assert len((Path(cfg.workdir) / cfg.study / "evaluate.jsonl").read_text().splitlines()) == n_lines
    assert "not redone" in capsys.readouterr().out


def test_kill_9_mid_evaluation_then_rerun_reattaches(study):
    cfg, state, tmp = study
    args = evaluate_args(cfg, "--top", "1", "--tasks", "mmlu", "--limit", "1")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    journal = Journal(Path(cfg.workdir) / cfg.study / "evaluate.jsonl")
    deadline = time.time() + 60
    while time.time() < deadline:  # kill as soon as the job is submitted, long before it can finish
        evals = load_evaluations(journal).items
        submitted = {k: e.job.job_id for k, e in evals.items() if e.job.job_id and e.status is None}
        if submitted:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(submitted) == 1
    assert main(args) == 0
    evals = load_evaluations(journal).items
    (key, job_id), = submitted.items()
    assert evals[key].job.job_id == job_id and evals[key].status == "ok" and evals[key].logged
    assert sum(key in r["jobs"] for r in events(cfg, "submitted")) == 1, "the job was resubmitted, not re-attached"
    best = min(state.finished, key=lambda t: t.value)
    assert MlflowClient(cfg.tracking()).get_run(best.run_id).data.tags["eval_key"] == key


def test_a_failed_evaluation_is_recorded_not_fatal(study, capsys):
    cfg, state, _ = study
    assert main(evaluate_args(cfg, "--top", "1", "--tasks", "bbh", "--data-dir", "/nonexistent")) == 1  # all failed
    evals = load_evaluations(Journal(Path(cfg.workdir) / cfg.study / "evaluate.jsonl")).items
    (failed,) = [e for e in evals.values() if e.data["spec"]["tasks"] == "bbh"]
    assert failed.status == "failed" and "/nonexistent" in failed.reason
    out = capsys.readouterr()
    assert "evaluation FAILED" in out.out and "evaluations: 0 ok, 1 failed" in out.out
    assert out.err.strip() == "error: every evaluation of study 'ev' failed (see the reasons above)"
    best = min(state.finished, key=lambda t: t.value)
    assert MlflowClient(cfg.tracking()).get_run(best.run_id).data.tags["eval_status"] == "failed"
