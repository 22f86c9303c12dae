"""`python -m orchestrator confirm`: the best points retrained with new seeds, the best on average registered.

    .venv/bin/python -m pytest -q tests/test_confirm.py       # a few minutes: real tiny fine-tunes on this CPU
"""
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.study.confirm import load_retrains
from orchestrator.study.journal import Journal
from orchestrator.study.loop import run_study

from .conftest import REPO, kill_when

pytestmark = pytest.mark.slow
SPACE = {"r": {"choice": [4, 8], "default": 8}, "alpha": {"fixed": 16}, "dropout": {"fixed": 0.05},
         "lr": {"choice": [3e-4, 1e-3, 2e-3], "default": 1e-3}}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("confirm")
    cfg = load_config(None, study="conf", algo="random", budget=3, parallel=2, executor="local", poll_s=0.3, seed=1,
                      workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db", space=SPACE,
                      trial={"max_steps": 8, "log_every": 2, "data": {"total_rows": 300}})
    state = run_study(cfg, out=open(os.devnull, "w"))
    assert all(t.status == "ok" for t in state.finished)
    return cfg, state


def args(cfg, *extra):
    return ["confirm", "--study", cfg.study, "--workdir", cfg.workdir, "--tracking-uri", cfg.tracking(),
            "--poll", "0.3", *extra]


def test_confirm_registers_the_best_mean_with_its_spread(study, capsys):
    cfg, state = study
    assert main(args(cfg, "--top", "2", "--seeds", "2")) == 0
    out = capsys.readouterr().out
    items = load_retrains(Journal(cfg.folder / "confirm.jsonl")).items
    top2 = sorted(state.finished, key=lambda t: t.value)[:2]
    assert sorted((i.data["trial"], i.data["seed"]) for i in items.values()) == \
        sorted((t.trial, s) for t in top2 for s in (43, 44))  # the trial seed is 42: two new ones
    assert all(i.status == "ok" for i in items.values())
    means = {t.trial: sum(i.result.value for i in items.values() if i.data["trial"] == t.trial) / 2 for t in top2}
    winner = min(means, key=means.get)
    client = MlflowClient(cfg.tracking())
    version = client.get_model_version_by_alias("conf-adapter", "champion")
    assert version.run_id == state.trials[winner].run_id
    assert float(version.tags["confirm_mean"]) == pytest.approx(means[winner], rel=1e-5)
    assert version.tags["confirm_n"] == "2" and float(version.tags["confirm_sd"]) >= 0
    assert "| 1 | " in out and "rule: mean" in out
    parent = {a.path for a in client.list_artifacts(state.parent_run_id)}
    assert "confirm_table.md" in parent
    runs = client.search_runs([client.get_experiment_by_name("conf").experiment_id], "tags.role = 'retrain'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" and "val_loss" in r.data.metrics for r in runs)

    assert main(args(cfg, "--top", "2", "--seeds", "2")) == 0  # a rerun redoes nothing, registers the same version
    assert len(load_retrains(Journal(cfg.folder / "confirm.jsonl")).items) == 4
    assert client.get_model_version_by_alias("conf-adapter", "champion").version == version.version


def test_kill_9_during_confirm_then_rerun_reattaches(study, tmp_path):
    cfg, state = study
    journal = Journal(cfg.folder / "confirm.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args(cfg, "--top", "1", "--seeds", "3",
                                                                         "--register-as", "")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def running():
        if not journal.exists():
            return False
        items = load_retrains(journal).items
        return any(i.job.job_id and i.status is None for i in items.values() if i.data["seed"] == 45)
    kill_when(proc, running, 300, "a retrain job running")
    before = load_retrains(journal).items
    jobs = {k: i.job.job_id for k, i in before.items() if i.job.job_id and i.status is None}
    assert main(args(cfg, "--top", "1", "--seeds", "3", "--register-as", "")) == 0
    after = load_retrains(journal).items
    for key, job_id in jobs.items():
        assert after[key].job.job_id == job_id and after[key].status == "ok", "a running retrain was resubmitted"
    submitted = [r for r in journal.records() if r["event"] == "submitted"]
    assert sum(len(r["jobs"]) for r in submitted) == len(after), "a retrain ran twice"


def test_confirm_needs_a_study_with_finished_trials(tmp_path, capsys):
    cfg = load_config(None, study="empty", workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/m.db")
    Journal(cfg.folder / "journal.jsonl").append("start", config=cfg.to_dict(), study_uid="x")
    assert main(["confirm", "--study", "empty", "--workdir", cfg.workdir]) == 2
    assert "no successful trial to confirm" in capsys.readouterr().err
    assert main(["confirm", "--study", "nope", "--workdir", cfg.workdir]) == 2


def test_evaluate_and_confirm_refuse_a_missing_study_and_a_second_run_in_one_line(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.study.lock import locked as locked_run

    with pytest.raises(ConfigError, match="no study 'nope' under .*: check the name and --workdir"):
        locked_run(str(tmp_path), "nope", "confirm.lock", "the confirmation", lambda: 0)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "journal.jsonl").write_text("")

    def second():
        with pytest.raises(ConfigError, match="the evaluation of study 's' is already run by pid"):
            locked_run(str(tmp_path), "s", "evaluate.lock", "the evaluation", lambda: 0)
        return "ran"
    assert locked_run(str(tmp_path), "s", "evaluate.lock", "the evaluation", second) == "ran"
