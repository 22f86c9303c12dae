"""One champion rule: the study's end, `register`, `evaluate --top`, `confirm --top`, `compare` and `status` name
the same trial, on a constrained study and on a two-objective study (where the loss alone names another).

    .venv/bin/python -m pytest -q tests/test_champion.py        # unit tier (MLflow: the in-memory fake)
"""
from types import SimpleNamespace

import pytest

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.reports.compare import compare_row
from orchestrator.search.champion import champion, ranking
from orchestrator.search.criteria import Judge
from orchestrator.study import end
from orchestrator.study.confirm import Confirmer, load_retrains
from orchestrator.study.evaluate import select
from orchestrator.study.journal import Journal, open_study
from orchestrator.tracking.tracker import Tracker

from .fakes import fake_mlflow

pytestmark = pytest.mark.unit
URI = "memory://champion"
POINT = {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-5}
# (val_loss, peak memory GiB, training hours) per trial
TRIALS = [(1.00, 20.0, 2.0), (1.10, 5.0, 1.0), (1.30, 5.0, 0.5), (1.20, 4.0, 3.0)]
STUDIES = {
    # the lowest loss (trial 0) needs 20 GiB: infeasible; the champion is trial 1
    "constrained": dict(constraints=[{"metric": "peak_memory_gb", "max": 10}]),
    # two objectives, the rule picks the lowest loss that trains within 1.5 h: trial 1 again, not trial 0
    "pareto": dict(objectives=["val_loss", "train_hours"], champion_rule="min val_loss s.t. train_hours <= 1.5"),
}


def write_study(workdir, name, settings, store_client_runs=True):
    """A finished fine-tune study, journaled as the loop journals one, with its MLflow runs."""
    cfg = load_config(None, study=name, algo="random", budget=len(TRIALS), executor="debug",
                      workdir=str(workdir), tracking_uri=URI, **settings)
    journal = Journal(cfg.folder / "journal.jsonl")
    journal.append("start", config=cfg.to_dict(), study_uid=f"uid-{name}", executor="debug")
    judge = Judge(cfg)
    for k, (loss, memory, hours) in enumerate(TRIALS):
        point = {**POINT, "r": 4 * (k + 1)}
        journal.append("trial", trial=k, point=point, encoded=None, out=str(cfg.folder / "trials" / f"{k:04d}"))
        summary = {"val_loss": loss, "peak_memory_bytes": memory * 2**30, "train_s": hours * 3600}
        verdict = judge.after("ok", loss, summary)
        summary.update({f"constraint.{c.metric}": v for c, v in zip(judge.constraints, verdict.constraints or [])},
                       feasible=verdict.feasible)
        journal.append("result", trial=k, status="ok", value=loss, reason=None, summary=summary)
    tracker = Tracker(URI, name, cfg.folder / "mlflow-outbox.jsonl", f"uid-{name}")
    tracker.start_parent(cfg.to_dict(), {})
    for k in range(len(TRIALS)):
        tracker.start_child(k, {**POINT, "r": 4 * (k + 1)}, None, "random")
    assert tracker.close(wait_s=30)
    return cfg


@pytest.mark.parametrize("name", list(STUDIES))
def test_every_reader_names_the_same_champion(tmp_path, monkeypatch, capsys, name):
    with fake_mlflow(monkeypatch) as store:
        write_study(tmp_path, name, STUDIES[name])
        state, cfg = open_study(str(tmp_path), name)
        judge = Judge(cfg)
        lowest_loss = min(state.finished, key=lambda t: t.value).trial
        expected = champion(state.finished, judge).trial
        assert expected == 1 != lowest_loss

        # the study's end: what it registers
        tracker = Tracker(URI, name, cfg.folder / "mlflow-outbox.jsonl", state.study_uid)
        queued = end.queue_registration(cfg, state, tracker, judge)
        assert tracker.close(wait_s=30)
        assert end.journal_registration(cfg, state, Journal(cfg.folder / "journal.jsonl"), tracker,
                                        queued)["trial"] == expected
        # `register`
        assert main(["register", "--study", name, "--workdir", str(tmp_path), "--register-as", f"{name}-again"]) == 0
        assert f"registered trial {expected} " in capsys.readouterr().out
        versions = store.models[f"{name}-again"]["versions"]
        assert [v["run_id"] for v in versions.values()] == [store.runs[run].run_id for run in store.runs
                                                            if store.runs[run].tags.get("trial") == str(expected)]
        # `evaluate --top 1` and `confirm --top 1`
        assert list(select(state, cfg, 1, include_default=False, log=lambda *a: None)) == [expected]
        args = SimpleNamespace(workdir=str(tmp_path), study=name, tracking_uri=None, executor=None, top=1, seeds=2,
                               rule="mean", register_as="", poll_s=0.1)
        confirmer = Confirmer(args, log=lambda *a: None)
        confirmer._plan()
        confirmer.tracker.close()
        retrains = load_retrains(Journal(cfg.folder / "confirm.jsonl")).items.values()
        assert {i.data["trial"] for i in retrains} == {expected}
        # `compare` and `status`
        assert compare_row(name, state, cfg, None)["best_trial"] == expected
        assert main(["status", "--study", name, "--workdir", str(tmp_path)]) == 0
        assert f"champion: trial {expected}," in capsys.readouterr().out


def test_the_ranking_puts_infeasible_trials_out_and_the_rules_pick_first(tmp_path):
    cfg = write_study_config(tmp_path, "pareto")
    state = SimpleNamespace(finished=[_trial(k, *t) for k, t in enumerate(TRIALS)])
    judge = Judge(cfg)
    order = [t.trial for t in ranking(state.finished, judge)]
    assert order[0] == 1 and set(order) == {0, 1, 2, 3}  # trial 3 (1.2, 3 h) is dominated: last
    assert order[-1] == 3
    constrained = Judge(write_study_config(tmp_path, "constrained"))
    summaries = [_trial(k, *t, judge=constrained) for k, t in enumerate(TRIALS)]
    assert [t.trial for t in ranking(summaries, constrained)] == [1, 3, 2]
    impossible = load_config(None, study="x", objectives=["val_loss", "train_hours"], tracking_uri=URI,
                             champion_rule="min val_loss s.t. train_hours <= 0.1")
    assert champion(state.finished, Judge(impossible)) is None  # no trial qualifies: nothing is registered
    assert ranking(state.finished, Judge(impossible))  # but the front is still ranked


def write_study_config(tmp_path, name):
    return load_config(None, study=name, algo="random", workdir=str(tmp_path), tracking_uri=URI, **STUDIES[name])


def _trial(k, loss, memory, hours, judge=None):
    summary = {"val_loss": loss, "peak_memory_bytes": memory * 2**30, "train_s": hours * 3600}
    if judge is not None:
        summary["feasible"] = judge.after("ok", loss, summary).feasible
    return SimpleNamespace(trial=k, status="ok", value=loss, summary=summary, point=POINT)


def test_champion_rule_mean_passes_over_a_lucky_draw():
    """`champion_rule: mean` (one objective): a trial whose loss was a lucky draw among worse neighbours is not the
    champion; the model's mean names one whose true loss is lower. Two objectives do not take it."""
    import math

    import numpy as np

    from orchestrator.config import ConfigError

    def true(lr):
        return 1.0 + 0.05 * (math.log10(lr) + 4.0) ** 2   # optimum at lr = 1e-4

    rng = np.random.default_rng(3)
    lrs = [float(lr) for lr in np.logspace(-6, -2, 17)] + [10 ** -2.75]
    values = [true(lr) + float(rng.normal(0, 0.01)) for lr in lrs[:-1]] + [0.97]  # the last: true 1.078, lucky
    trials = [SimpleNamespace(trial=k, status="ok", value=v, summary={"val_loss": v}, point={**POINT, "lr": lr})
              for k, (lr, v) in enumerate(zip(lrs, values))]
    plain = load_config(None, study="m", algo="random", tracking_uri=URI)
    noisy = load_config(None, study="m", algo="random", tracking_uri=URI, champion_rule="mean")
    assert noisy.to_dict()["champion_rule"] == "mean" and Judge(noisy).mean and not Judge(plain).mean
    assert champion(trials, Judge(plain)).trial == len(lrs) - 1          # lowest loss: the lucky draw
    best = champion(trials, Judge(noisy))
    assert best.trial != len(lrs) - 1 and true(best.point["lr"]) < 1.01
    assert ranking(trials, Judge(noisy))[0] is best and len(ranking(trials, Judge(noisy))) == len(trials)
    assert champion(trials[:5], Judge(noisy)) is min(trials[:5], key=lambda t: t.value)  # too few: by value
    with pytest.raises(ConfigError, match="mean ranks one objective"):
        load_config(None, study="m", objectives=["val_loss", "train_hours"], tracking_uri=URI, champion_rule="mean")
