"""Constraints, metrics, Pareto fronts and champion rules (orchestrator/search/criteria.py): pure logic."""
import re

import pytest

from orchestrator.search.criteria import (Constraint, CriteriaError, a_priori_metrics, hypervolume, knee, model_shapes,
                                   parse_constraints, parse_objectives, parse_rule, pareto_front, pick, trial_metrics)


@pytest.mark.unit
def test_constraints_parse_and_give_nomads_values():
    pb, eb = parse_constraints([{"metric": "peak_memory_gb", "max": 40, "kind": "pb"},
                                {"metric": "dev.mmlu", "min": 0.3, "kind": "eb"}])
    assert pb == Constraint("peak_memory_gb", 40.0, "max", "pb") and eb.sense == "min"
    assert pb.value({"peak_memory_gb": 42.5}) == pytest.approx(2.5)   # violated: > 0
    assert eb.value({"dev.mmlu": 0.35}) == pytest.approx(-0.05)       # satisfied: <= 0
    assert pb.value({}) is None


@pytest.mark.unit
@pytest.mark.parametrize("items, says", [
    ([{"metric": "gpu_memory", "max": 1}], "not one a trial reports; use one of val_loss"),
    ([{"metric": "val_loss", "max": "2e7"}], "must be a number"),
    ([{"metric": "val_loss", "max": 1, "min": 0}], "exactly one of max or min"),
    ([{"metric": "val_loss", "max": 1, "kind": "soft"}], "pb (progressive barrier) or eb"),
    ({"metric": "val_loss"}, "must be a list"),
])
def test_bad_constraints_say_what_to_write(items, says):
    with pytest.raises(CriteriaError, match=re.escape(says)):
        parse_constraints(items)


@pytest.mark.unit
def test_objectives_and_rules():
    assert parse_objectives(["val_loss", "train_hours"]) == ("val_loss", "train_hours")
    for bad in (["val_loss"], ["val_loss", "val_loss"], ["val_loss", "speed"]):
        with pytest.raises(CriteriaError):
            parse_objectives(bad)
    assert parse_rule(None) == "knee"
    assert parse_rule("min val_loss s.t. train_hours <= 1.5 and peak_memory_gb <= 40") == \
        ("val_loss", (("train_hours", "<=", 1.5), ("peak_memory_gb", "<=", 40.0)))
    with pytest.raises(CriteriaError, match="champion_rule"):
        parse_rule("lowest loss please")


@pytest.mark.unit
def test_trial_metrics_from_a_summary():
    m = trial_metrics({"peak_memory_bytes": 2 * 2**30, "train_s": 5400, "total_s": 7200, "trainable_params": 1e6,
                       "dev.mmlu": 0.4}, 1.23)
    assert m == {"val_loss": 1.23, "peak_memory_gb": 2.0, "train_hours": 1.5, "total_hours": 2.0,
                 "trainable_params": 1e6, "adapter_mb": 4.0, "dev.mmlu": 0.4, "train_s": 5400, "total_s": 7200}


@pytest.mark.unit
def test_lora_parameters_are_known_before_training():
    tiny = model_shapes("tiny")
    assert tiny == {"model_type": "llama", "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 4, "head_dim": 32,
                    "intermediate": 344}
    assert a_priori_metrics(8, ["q_proj", "v_proj"], tiny)["trainable_params"] == 2 * 2 * 8 * (128 + 128)
    llama = model_shapes("meta-llama/Llama-2-7b-hf")
    assert a_priori_metrics(512, ["q_proj", "v_proj"], llama)["trainable_params"] == 32 * 2 * 512 * 8192
    # MLP modules from intermediate_size (the other families and target sets: tests/test_architectures.py)
    assert a_priori_metrics(8, ["up_proj"], tiny)["trainable_params"] == 2 * 8 * (128 + 344)
    assert a_priori_metrics(8, ["q_proj", "gate_bias"], tiny) == {}  # a name of no known layer: after training
    assert a_priori_metrics(8, ["q_proj"], None) == {}


def test_a_lora_parameter_count_matches_peft(tiny_model_dir):
    """The formula against PEFT's own count on the tiny model (the trainable parameters a fine-tune reports)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert a_priori_metrics(16, ["q_proj", "v_proj"], model_shapes("tiny"))["trainable_params"] == counted


@pytest.mark.unit
def test_pareto_front_hypervolume_and_knee():
    points = {"a": (1.0, 5.0), "b": (2.0, 2.0), "c": (5.0, 1.0), "d": (3.0, 3.0), "e": (2.5, 2.0)}
    front = pareto_front(points)
    assert set(front) == {"a", "b", "c"}
    assert hypervolume(front, (6.0, 6.0)) == pytest.approx(5 * 1 + 4 * 3 + 1 * 1)
    assert knee(front) == "b"
    metrics = {k: {"val_loss": v[0], "train_hours": v[1]} for k, v in points.items()}
    assert pick(parse_rule("min val_loss s.t. train_hours <= 2.5"), points, metrics) == "b"
    assert pick("knee", points, metrics) == "b"
    assert pick(parse_rule("min val_loss s.t. train_hours <= 0.5"), points, metrics) is None


@pytest.mark.unit
def test_the_memory_estimate_is_an_a_priori_constraint():
    from orchestrator.config import load_config
    from orchestrator.search.criteria import Judge
    paper = load_config(None, preset="paper", constraints=[{"metric": "peak_memory_gb_estimate", "max": 28}])
    judge = Judge(paper)
    small, large = ({**paper.space.default_point(), "r": r} for r in (8, 512))
    assert judge.before(small)[1] is None  # fits: submitted
    prior, why = judge.before(large)      # the rank-512 adapter's optimizer state passes 28 GiB: never submitted
    assert "peak_memory_gb_estimate" in why and prior["peak_memory_gb_estimate"] > 28
