"""Merge precision: a low-learning-rate adapter merged into bf16 weights loses most of its update; the default
(fp32, unmerged: InstructEval's) keeps it whole. The figures: bench/merge_precision.py, evaluation/PROTOCOL.md.

    .venv/bin/python -m pytest tests/test_eval_precision.py -q      # tiny model, CPU, about ten seconds
"""
import tempfile
from pathlib import Path

import pytest

from bench.merge_precision import loaded, measure, write_adapter


@pytest.fixture(scope="module")
def figures(tiny_model_dir):
    return measure(0.4)  # an update of 0.4 bf16 rounding steps per weight, on average


def test_merging_into_bf16_weights_loses_a_small_update_and_changes_the_logits(figures):
    share, _ = figures["bf16 merged in bf16"]["weights"]
    assert share < 0.5, f"merging into bf16 weights kept {share:.0%} of a 0.4-ulp update"
    assert figures["merged_vs_unmerged_bf16_max"] > 1e-2  # a measurable difference in the bf16 logits
    # merging in fp32 first (merge=True with dtype bf16) keeps the update on average, rounded once
    assert 0.8 < figures["bf16 merged in fp32"]["weights"][0] < 1.2


def test_the_default_keeps_the_update_whole(figures):
    assert figures["fp32 unmerged"]["logit_error"] == 0.0  # the default is the reference itself
    assert figures["fp32 merged"]["weights"][0] == pytest.approx(1.0, abs=1e-3)
    assert figures["fp32 merged"]["logit_error"] < 0.05 and figures["merged_vs_unmerged_fp32_max"] < 1e-4


def test_unmerged_on_a_bf16_base_keeps_the_adapter_in_fp32(tiny_model_dir):
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model, _ = loaded("bf16 unmerged", write_adapter(Path(tmp) / "adapter", 0.4))
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {torch.float32} and {p.dtype for n, p in model.named_parameters() if "base_layer" in n} == \
        {torch.bfloat16}
