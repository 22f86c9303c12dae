"""Any causal LM: the recipe on tiny random-weight Llama, Mistral, Qwen2, Gemma, Gemma 2 and GPT-NeoX models built
from their transformers configs (jobs/tiny_arch.py); target modules by list, "attention" or "all-linear";
rsLoRA and DoRA; the a-priori trainable-parameter count the orchestrator checks constraints with."""
import re

import pytest
import torch

from jobs import finetune as F
from jobs.model import TrainingFailure, add_lora, attention_names, linear_names
from jobs.spec import FinetuneSpec, SpecError, preset
from jobs.tiny_arch import ARCHS, arch_model_dir
from orchestrator.search.criteria import a_priori_metrics, model_shapes

ATTENTION = {"gpt_neox": ["dense", "query_key_value"]}  # the others: Llama's names
LLAMA_ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
# one training run per architecture, each with another adapter recipe
RECIPES = {"llama": dict(target_modules="all-linear"),
           "mistral": dict(target_modules="attention", use_dora=True),
           "qwen2": dict(target_modules=["q_proj", "v_proj"], use_rslora=True),
           "gemma": dict(target_modules="all-linear", use_dora=True, use_rslora=True),
           "gemma2": dict(target_modules="attention"),
           "gpt_neox": dict(target_modules=["query_key_value", "dense_4h_to_h"], alpha_ratio=2.0)}


@pytest.fixture(scope="module")
def folders(tiny_model_dir):
    return {arch: str(arch_model_dir(arch)) for arch in ARCHS}


def _load(folder):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _spec(tmp_path, arch, folder, **kw):
    return preset("tiny", base_model=folder, out=str(tmp_path / arch), max_steps=4, lr=5e-3, r=8, alpha=16,
                  per_device_batch=4, grad_accum=1, max_seq_len=128, eval_before=True, prompt_template="chat",
                  data={"sources": [{"name": "bundled:tiny-chat"}], "total_rows": 80,
                        "cache_dir": str(tmp_path / "data")}, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_architecture_fine_tunes_through_the_recipe(tmp_path, folders, arch):
    spec = _spec(tmp_path, arch, folders[arch], **RECIPES[arch])
    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    assert result["val_loss"] < result["val_loss_before"], "no gradient reached the adapter"
    prior = a_priori_metrics(spec.r, spec.target_modules, model_shapes(folders[arch]), spec.use_dora)
    assert result["trainable_params"] == prior["trainable_params"]
    assert (tmp_path / arch / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_priori_counts_equal_peft_on_every_target_set(folders, arch):
    shapes = model_shapes(folders[arch])
    assert shapes["model_type"] == arch
    base = _load(folders[arch])
    assert attention_names(base) == ATTENTION.get(arch, LLAMA_ATTENTION)
    for targets in ("all-linear", "attention", [attention_names(base)[0]], linear_names(base)[-2:]):
        for dora in (False, True):
            model = add_lora(_load(folders[arch]), FinetuneSpec(base_model=folders[arch], r=4,
                                                                target_modules=targets, use_dora=dora))
            counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert a_priori_metrics(4, targets, shapes, dora) == {"trainable_params": counted,
                                                                 "adapter_mb": counted * 4 / 1e6}, (targets, dora)


def test_modules_a_model_lacks_are_a_one_line_error_naming_those_it_has(folders):
    spec = FinetuneSpec(base_model=folders["gpt_neox"], target_modules=["q_proj", "v_proj"])
    with pytest.raises(TrainingFailure) as e:
        add_lora(_load(folders["gpt_neox"]), spec)
    message = str(e.value)
    assert "\n" not in message and "['q_proj', 'v_proj']" in message and "gpt_neox" in message
    assert "dense, dense_4h_to_h, dense_h_to_4h, query_key_value" in message and "all-linear" in message
    # a typo among right names is refused too (PEFT alone would adapt the right ones and say nothing)
    with pytest.raises(TrainingFailure, match="'v_prj'"):
        add_lora(_load(folders["llama"]), spec.replace(base_model=folders["llama"], target_modules=["q_proj", "v_prj"]))


def test_a_failed_lookup_is_a_failed_result(tmp_path, folders):
    result = F.run(_spec(tmp_path, "gpt_neox", folders["gpt_neox"], target_modules=["q_proj"]))
    assert result["status"] == "failed" and "whose linear layers are" in result["reason"]


def test_rslora_and_dora_reach_peft(folders):
    model = add_lora(_load(folders["qwen2"]), FinetuneSpec(base_model=folders["qwen2"], r=16, alpha=32,
                                                           use_rslora=True, use_dora=True))
    config = model.peft_config["default"]
    assert config.use_rslora and config.use_dora
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(32 / 16 ** 0.5)  # alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector


@pytest.mark.unit
def test_modern_spec_fields_are_validated_and_derived():
    spec = FinetuneSpec(r=16, alpha_ratio=2.0, per_device_batch=4, effective_batch=64)
    assert spec.alpha == 32 and spec.grad_accum == 16
    assert spec.with_world(4).grad_accum == 4 and spec.grad_accum == 16
    assert FinetuneSpec.from_dict(spec.replace(r=64).to_dict()).alpha == 128  # alpha follows r
    assert FinetuneSpec(target_modules="all-linear").target_modules == "all-linear"
    with pytest.raises(SpecError, match="multiple of 12"):
        FinetuneSpec(per_device_batch=4, effective_batch=40).with_world(3)
    for bad, words in ((dict(effective_batch=30, per_device_batch=4), "effective_batch=30"),
                       (dict(alpha_ratio=0), "alpha_ratio=0"), (dict(use_dora="yes"), "use_dora='yes'"),
                       (dict(target_modules="everything"), "target_modules='everything'"),
                       (dict(target_modules=[]), "target_modules=[]"),
                       (dict(chat_template="{{ x }}"), "set prompt_template: chat")):
        with pytest.raises(SpecError, match=re.escape(words)):
            FinetuneSpec(**bad)
