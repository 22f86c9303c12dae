"""The typed study configuration: validated once on construction, without side effects; the one plain form the
journal keeps, read back by StudyConfig.from_journal (journals of earlier versions included).

    .venv/bin/python -m pytest -q tests/test_config_typed.py     # unit tier
"""
import copy
import math

import pytest

from evaluation.spec import EvaluationSpec
from jobs.spec import FinetuneSpec
from orchestrator.config import ConfigError, HeldoutObjective, StudyConfig, load_config
from orchestrator.search.criteria import ChampionRule, Constraint
from slurm.dispatch import RetryPolicy

pytestmark = pytest.mark.unit
RAW = {"study": "typed", "algo": "nomad", "budget": 5, "trial": {"max_steps": 3, "epochs": 1.0},
       "constraints": [{"metric": "peak_memory_gb", "max": 40, "kind": "eb"}],
       "objectives": ["val_loss", "train_hours"], "champion_rule": "min val_loss s.t. train_hours <= 2",
       "pruner": {"kind": "asha", "min_fraction": 0.25}, "evaluation": {"decoding": "greedy", "limit": 3},
       "retries": {"on": ["timeout"], "outage_hours": 2}, "pareto_reference": [5, 1]}


def test_every_section_is_the_typed_object_its_consumer_uses():
    c = load_config(None, **copy.deepcopy(RAW))
    assert isinstance(c.trial, FinetuneSpec) and c.trial.max_steps == 3
    assert isinstance(c.evaluation, EvaluationSpec) and c.evaluation.decoding == "greedy"
    assert c.constraints == (Constraint("peak_memory_gb", 40.0, "max", "eb"),)
    assert c.objectives == ("val_loss", "train_hours") and isinstance(c.champion_rule, ChampionRule)
    assert c.champion_rule.parsed == ("val_loss", (("train_hours", "<=", 2.0),))
    assert c.pruner.kind == "asha" and isinstance(c.retries, RetryPolicy) and c.retries.outage_hours == 2
    assert c.pareto_reference == (5.0, 1.0)
    # the pruner's rungs become each trial's report points, derived: the trial settings are not mutated
    assert c.trial.eval_fractions == [] and c.trial_spec(c.space.default_point(), "/tmp/t").eval_fractions


def test_construction_mutates_nothing_and_starts_nothing(monkeypatch):
    import subprocess

    def refuse(*a, **k):
        raise AssertionError("validation started a process")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    raw = copy.deepcopy(RAW)
    load_config(None, **raw)
    assert raw == RAW, "the input mapping was changed"


def test_the_plain_form_round_trips_and_is_what_commands_read():
    c = load_config(None, **copy.deepcopy(RAW))
    d = c.to_dict()
    again = StudyConfig.from_journal(d)
    assert again.to_dict() == d and again.champion_rule.parsed == c.champion_rule.parsed
    assert StudyConfig.from_journal({**d, "executor_resolved": "local"}).to_dict() == d  # older journals
    assert StudyConfig.from_journal(d, budget=9, tracking_uri=None).budget == 9


def test_an_older_journals_partial_trial_settings_read_back_whole():
    old = {"study": "old", "algo": "tpe", "budget": 4, "parallel": 1, "seed": 0, "executor": "local",
           "workdir": "runs", "tracking_uri": None, "register_as": None, "objective": None, "poll_s": 1.0,
           "preset": "tiny", "space": {}, "searcher_options": {}, "trial": {"base_model": "tiny", "epochs": 1.0},
           "resources": {"cpus_per_task": 1, "timeout_min": 30}, "retries": {}, "evaluation": {}, "pruner": None,
           "constraints": [], "objectives": None, "champion_rule": None, "pareto_reference": None,
           "warm_start": [], "executor_resolved": "local"}
    c = StudyConfig.from_journal(old)
    assert c.trial.epochs == 1.0 and c.trial.r == 8 and c.objectives == () and c.register_name == "old-adapter"


def test_a_heldout_objective_is_typed():
    c = load_config(None, study="h", objective={"metric": "heldout", "tasks": {"mmlu": 10}})
    assert isinstance(c.objective, HeldoutObjective) and c.heldout.tasks == {"mmlu": 10} and c.function is None
    assert c.to_dict()["objective"] == {"metric": "heldout", "tasks": {"mmlu": 10}, "weight_val_loss": 0.0, "seed": 0}


@pytest.mark.parametrize("change, says", [
    ({"pareto_reference": [math.nan, 1]}, "'pareto_reference'"),
    ({"objectives": ["val_loss", "bogus"]}, "'objectives'"),
    ({"objectives": None}, "'champion_rule': it picks among a Pareto front"),
    ({"trial": {"r": 0}}, "'trial': r=0 is invalid"),
    ({"evaluation": {"decodin": "greedy"}}, "'evaluation': unknown key 'decodin'"),
    ({"retries": {"outage_hours": -1}}, "outage_hours=-1 is invalid"),
    ({"searcher_options": {"x": 1}, "algo": "random"}, "algo random takes no options"),
    ({"pruner": {"kind": "median"}, "objective": "tests.objectives:landscape"}, "cannot be pruned"),
    ({"budget": True}, "'budget'"),
])
def test_a_bad_value_is_one_line_naming_the_key(change, says):
    with pytest.raises(ConfigError) as e:
        load_config(None, **{**copy.deepcopy(RAW), **change})
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_registered_name_has_one_definition():
    assert load_config(None, study="a").register_name == "a-adapter"
    assert load_config(None, study="a", register_as="x").register_name == "x"
    assert load_config(None, study="a", register_as="").register_name is None
    assert load_config(None, study="a", objective="tests.objectives:landscape").register_name is None
