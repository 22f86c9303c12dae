"""`--resume` makes MLflow agree with the journal whatever happened to the store: runs and registrations it lost
are re-created from the journal and the trial folders.

    .venv/bin/python -m pytest -q tests/test_reconcile.py      # unit tier (MLflow: the in-memory fake)
"""
import pytest

from orchestrator.__main__ import main
from orchestrator.study.journal import load_study

from .fakes import fake_mlflow

pytestmark = pytest.mark.unit
URI = "memory://reconcile"


def args(tmp_path, *extra):
    return ["--study", "s", "--algo", "random", "--budget", "3", "--executor", "debug", "--poll", "0.05",
            "--objective", "tests.objectives:landscape", "--workdir", str(tmp_path), "--tracking-uri", URI, *extra]


def by_role(store):
    runs = list(store.runs.values())
    return [r for r in runs if r.tags.get("role") == "study"], [r for r in runs if r.tags.get("role") == "trial"]


@pytest.mark.parametrize("loss", ["everything", "two trial runs"])
def test_a_resume_recreates_what_the_store_lost(tmp_path, monkeypatch, capsys, loss):
    with fake_mlflow(monkeypatch) as store:
        assert main(args(tmp_path)) == 0
        state = load_study(tmp_path / "s")
        values = {t.trial: t.value for t in state.finished}
        if loss == "everything":  # a store deleted, or restored from a backup older than the study
            store.runs.clear()
            store.experiments.clear()
        else:
            for run_id in [t.run_id for t in state.finished][:2]:
                del store.runs[run_id]
        capsys.readouterr()
        assert main(args(tmp_path, "--resume")) == 0
        assert "re-created from the journal" in capsys.readouterr().out
        parents, children = by_role(store)
        assert len(parents) == 1 and parents[0].status == "FINISHED"
        assert sorted(int(r.tags["trial"]) for r in children) == sorted(values)
        for r in children:
            assert r.status == "FINISHED" and r.metrics["val_loss"] == pytest.approx(values[int(r.tags["trial"])])
            assert r.tags["mlflow.parentRunId"] == parents[0].run_id
        again = load_study(tmp_path / "s")
        assert {t.run_id for t in again.trials.values()} == {r.run_id for r in children}
        assert main(args(tmp_path, "--resume")) == 0  # nothing lost this time: nothing re-created
        assert "re-created" not in capsys.readouterr().out and len(store.runs) == 4
