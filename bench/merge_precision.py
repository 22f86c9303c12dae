"""How much of a small LoRA update survives each way of loading the adapter: the figure in evaluation/PROTOCOL.md.

    .venv/bin/python bench/merge_precision.py                    # tiny model, CPU, updates of 0.1 to 4 bf16 ulps
    .venv/bin/python bench/merge_precision.py --ulps 0.4 --prompts 16

An adapter is written whose update B @ A * alpha / r is, element by element, a set fraction of the bf16
rounding step (ulp) of the weight it changes: a low-learning-rate adapter, like the paper's default point.
For each loading mode, the adapter's effect on the logits, d = logits(base + adapter) - logits(base) (both in
that mode's dtype), is compared with the reference's (fp32, unmerged): retained = <d, d_ref> / <d_ref, d_ref>
(1: the whole update acts; 0: it is lost) and error = |d - d_ref| / |d_ref|. Modes:
  fp32 unmerged         InstructEval's and our default (the reference itself)
  fp32 merged           merge=True, dtype fp32
  bf16 unmerged         dtype bf16: the base in bf16, the LoRA branch kept apart (PEFT computes it in fp32)
  bf16 merged in fp32   merge=True, dtype bf16: W + BA merged in fp32, then rounded to bf16 once
  bf16 merged in bf16   the former behaviour: weights rounded to bf16 first, the update added in bf16
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("fp32 unmerged", "fp32 merged", "bf16 unmerged", "bf16 merged in fp32", "bf16 merged in bf16")


def write_adapter(folder: Path, ulps: float, seed: int = 0) -> Path:
    """A q_proj/v_proj adapter for the tiny model whose update is `ulps` bf16 rounding steps of each weight,
    on average over its elements (random signs and sizes around that)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    from evaluation.model import resolve_base

    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_base("tiny", None), dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            b.normal_()
            delta = b @ a * layer.scaling["default"]
            w = layer.get_base_layer().weight
            ulp = torch.pow(2.0, torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
            b.mul_(ulps / (delta.abs() / ulp).mean())
    model.save_pretrained(str(folder))
    return folder


def logits(model, tokenizer, prompts):
    import torch

    with torch.inference_mode():
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        return model(**batch).logits.float()


def loaded(mode: str, adapter: Path | None):
    """The tiny model (+ adapter) loaded the way `mode` says, with its tokenizer."""
    import torch

    from evaluation.model import load, resolve_base

    dtype, merged = mode.split()[0], mode.split()[1] == "merged"
    if mode != "bf16 merged in bf16" or adapter is None:
        model, tokenizer, _ = load("tiny", str(adapter) if adapter else None, "cpu", dtype, merge=merged)
        return model, tokenizer
    from peft import PeftModel  # the former path: round the weights to bf16, then merge into them
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_base("tiny", None)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval(), AutoTokenizer.from_pretrained(path)


def true_update(adapter: Path) -> dict:
    """{weight name: B @ A * alpha / r} in fp32, from the adapter file (the update the training produced)."""
    import json

    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    return {k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight"):
            (tensors[k.replace("lora_A", "lora_B")].float() @ tensors[k].float()) * scale
            for k in tensors if "lora_A" in k}


def weight_share(model, base, update: dict) -> tuple[float, float]:
    """(share of the update the merged weights carry, relative error): <W - W0, dW> / |dW|^2, |W - W0 - dW| / |dW|."""
    params, params0 = dict(model.named_parameters()), dict(base.named_parameters())
    dot = norm = err = 0.0
    for name, dw in update.items():
        got = params[name].detach().float() - params0[name].detach().float()
        dot, norm, err = dot + float((got * dw).sum()), norm + float((dw * dw).sum()), err + float(((got - dw) ** 2).sum())
    return dot / norm, (err / norm) ** 0.5


def measure(ulps: float, n_prompts: int = 8) -> dict:
    """{mode: figures} for an update of `ulps` bf16 steps: "weights" (share of the update in the merged weights,
    merged modes), "logit_error" (|logits - reference logits| / |the reference adapter's effect|) and
    "max_logit_change" (the largest change of a logit from the adapter, in that mode)."""
    from jobs.data import load_rows

    prompts = [r["instruction"] for r in load_rows("bundled:tiny-alpaca")[:n_prompts]]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_adapter(Path(tmp) / "adapter", ulps)
        update = true_update(adapter)
        runs = {}
        for mode in MODES:
            model, tokenizer = loaded(mode, adapter)
            tokenizer.padding_side = "right"
            base, _ = loaded(mode, None)
            runs[mode] = (logits(model, tokenizer, prompts), logits(base, tokenizer, prompts))
            merged = mode.split()[1] == "merged"
            out[mode] = {"weights": weight_share(model, base, update) if merged else None}
    ref, ref_base = runs["fp32 unmerged"]
    effect = float((ref - ref_base).norm())
    for mode, (with_adapter, without) in runs.items():
        out[mode].update(logit_error=float((with_adapter - ref).norm()) / effect,
                         max_logit_change=float((with_adapter - without).abs().max()))
    out["effect"] = {"norm": effect, "max": float((ref - ref_base).abs().max())}
    out["merged_vs_unmerged_bf16_max"] = float((runs["bf16 merged in bf16"][0] - runs["bf16 unmerged"][0]).abs().max())
    out["merged_vs_unmerged_fp32_max"] = float((runs["fp32 merged"][0] - runs["fp32 unmerged"][0]).abs().max())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ulps", type=float, nargs="+", default=[0.1, 0.4, 1.0, 4.0])
    p.add_argument("--prompts", type=int, default=8)
    args = p.parse_args()
    merged = [m for m in MODES if m.split()[1] == "merged"]
    print("share of the update carried by the merged weights (1 = all; unmerged modes keep it whole, in fp32):")
    print(f"{'update (bf16 ulps)':>18}  " + "  ".join(f"{m:>20}" for m in merged))
    results = {ulps: measure(ulps, args.prompts) for ulps in args.ulps}
    for ulps, r in results.items():
        print(f"{ulps:>18}  " + "  ".join(f"{r[m]['weights'][0]:>8.3f} (err {r[m]['weights'][1]:.2f})" for m in merged))
    print("logits: |logits - fp32 unmerged logits| / |the adapter's effect on the fp32 logits|:")
    print(f"{'update (bf16 ulps)':>18}  " + "  ".join(f"{m:>20}" for m in MODES) + "   effect max |dlogit|")
    for ulps, r in results.items():
        print(f"{ulps:>18}  " + "  ".join(f"{r[m]['logit_error']:>20.3f}" for m in MODES)
              + f"   {r['effect']['max']:.4f}")
    for ulps, r in results.items():
        print(f"update {ulps} ulps: max |logit| difference merged-in-bf16 vs unmerged (bf16) "
              f"{r['merged_vs_unmerged_bf16_max']:.4f}; merged vs unmerged (fp32) {r['merged_vs_unmerged_fp32_max']:.2e}")


if __name__ == "__main__":
    main()
