"""A budget in GPU-hours: every attempt counts, no trial is submitted whose expected cost would pass the budget,
the spend is shown and journaled, and a resume keeps the count.

    .venv/bin/python -m pytest -q tests/test_spend.py            # unit tier (each attempt costs a fixed 1 GPU-hour
                                                                # here: the scheduler's figures are the slurm tier's)
"""
from types import SimpleNamespace

import pytest

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.study.journal import load_study
from orchestrator.study.spend import Spend
from slurm.dispatch import Attempt
from slurm.executors import Resources

from .fakes import fake_mlflow

pytestmark = pytest.mark.unit
URI = "memory://spend"


def args(tmp_path, *extra):
    return ["--study", "s", "--algo", "random", "--executor", "debug", "--poll", "0.05", "--objective",
            "tests.objectives:landscape", "--workdir", str(tmp_path), "--tracking-uri", URI, *extra]


def test_attempt_hours_are_elapsed_times_gpus_allocated_else_cpus():
    a = Attempt(task=None, job=None, job_id="1", elapsed_s=1800.0, gpus=4)
    assert a.hours(Resources(gpus_per_node=8)) == pytest.approx(2.0)   # the scheduler's allocation wins
    b = Attempt(task=None, job=None, job_id="2", elapsed_s=3600.0)
    assert b.hours(Resources(gpus_per_node=2, nodes=2)) == pytest.approx(4.0)
    assert b.hours(Resources(cpus_per_task=3)) == pytest.approx(3.0)    # no GPUs: CPU-hours
    assert Attempt(task=None, job=None, job_id="3").hours(Resources()) == 0.0  # never seen running


def test_one_more_trial_fits_only_with_its_expected_cost():
    spend = Spend(3.5, Resources(gpus_per_node=1))
    state = SimpleNamespace(finished=[])
    assert spend.fits_another(state, {}) and spend.expected(state) is None  # the first wave goes
    done = lambda *hours: SimpleNamespace(finished=[SimpleNamespace(summary={"gpu_hours": h}, status="ok")  # noqa
                                                    for h in hours])
    assert spend.fits_another(done(1.0, 1.0), {}) and not spend.fits_another(done(1.0, 1.0, 1.0), {})
    assert not spend.fits_another(done(1.0), {"7": 0.5, "8": 0.2})  # 1 + 0.7 + the rest of both (1.3) + 1 > 3.5
    assert spend.text(done(1.0, 1.5), {}) == "2.5/3.5 GPU-h"
    assert Spend(None, Resources()).fits_another(done(100.0), {})


def test_a_study_stops_when_one_more_trial_would_pass_the_budget_and_a_resume_keeps_the_count(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Attempt, "hours", lambda self, resources, now=None: 1.0 if self.ended_at else 0.0)
    monkeypatch.setenv("LORA_HPO_TEST_INTERRUPT", f"3:{tmp_path}/interrupted")
    config = ["--config", str(_yaml(tmp_path, "budget: {evaluations: 50, gpu_hours: 3.5}\nparallel: 1\n"
                                              "objective: tests.objectives:interrupted_once\n"))]
    with fake_mlflow(monkeypatch) as store:
        first = ["--study", "s", "--algo", "random", "--executor", "debug", "--poll", "0.05", *config,
                 "--workdir", str(tmp_path), "--tracking-uri", URI]
        assert main(first) == 130  # Ctrl-C during the 3rd trial
        assert [t.summary["gpu_hours"] for t in load_study(tmp_path / "s").finished] == [1.0, 1.0]
        capsys.readouterr()
        assert main(["--study", "s", "--resume", "--workdir", str(tmp_path), "--tracking-uri", URI]) == 0
        out = capsys.readouterr().out
        state = load_study(tmp_path / "s")
        assert len(state.finished) == 3 and sum(t.summary["gpu_hours"] for t in state.finished) == 3.0
        assert "the budget is spent (3/3.5 CPU-h)" in out, out  # no GPUs asked for: CPU-hours
        parent = next(r for r in store.runs.values() if r.tags.get("role") == "study")
        assert parent.metrics["gpu_hours_spent"] == 3.0


def _yaml(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def test_the_budget_key_takes_a_mapping():
    c = load_config(None, study="b", budget={"gpu_hours": 500})
    assert c.gpu_hours == 500 and c.budget == 1000
    assert load_config(None, study="b", budget=12).gpu_hours is None
