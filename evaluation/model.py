"""Load (base model, adapter) for evaluation, and prove the adapter is really in the model.

    from evaluation.model import load
    model, tokenizer, info = load("tiny", "runs/demo/adapter")     # info["lora_modules"] > 0, or an error

The adapter is a PEFT folder (or a fine-tune output folder holding adapter/), `runs:/RUN_ID/PATH` or
`models:/NAME@ALIAS` (downloaded with mlflow, imported only then). A wrong reference is an `EvalError`,
never a silent fallback to the base model. After loading, every LoRA tensor of the adapter file must be in
the model with the same values (a name mismatch leaves PEFT's fresh initialization, whose B = 0 makes the
adapter a no-op), and the number of LoRA-wrapped modules is recorded. The adapter is then merged into the
base weights (the same function, fewer kernels per token).
"""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.tasks.common import EvalError

TINY = "tiny"


def resolve_adapter(ref: str) -> Path:
    """A local PEFT folder for a path, a fine-tune output folder, runs:/... or models:/..."""
    if ref.startswith(("models:/", "runs:/")):
        try:
            import mlflow
            ref = mlflow.artifacts.download_artifacts(artifact_uri=ref)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise EvalError(f"adapter {ref} could not be downloaded from MLflow ({first}): check the run id or "
                            "model alias and MLFLOW_TRACKING_URI") from None
    folder = Path(ref).expanduser()
    for candidate in (folder, folder / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    why = "does not exist" if not folder.exists() else "holds no adapter_config.json"
    raise EvalError(f"adapter {ref} {why}: give a PEFT adapter folder, runs:/RUN_ID/PATH or models:/NAME@ALIAS")


def resolve_base(base: str | None, adapter: Path | None) -> str:
    """The base model folder or hub id: `base`, else the one recorded in the adapter; "tiny" is embedded."""
    if base is None and adapter is not None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise EvalError("no base model: pass --base (a hub id, a local folder or tiny)")
    if base == TINY or ("tiny-llama-" in base and not Path(base).exists()):
        from jobs.tiny import tiny_model_dir
        return str(tiny_model_dir())
    if base.startswith((".", "/", "~")) and not Path(base).expanduser().is_dir():
        raise EvalError(f"base model folder {base} does not exist: give a HF-layout folder, a hub id or tiny")
    return base


def pick_dtype(device, dtype: str = "auto"):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    choices = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype not in choices:
        raise EvalError(f"dtype {dtype!r} is unknown: choose auto, {', '.join(choices)}")
    return choices[dtype]


def load(base: str | None, adapter: str | None = None, device: str | None = None, dtype: str = "auto",
         merge: bool = True):
    """(model in eval mode, tokenizer with left padding, info) - info records what was loaded."""
    folder = resolve_adapter(adapter) if adapter else None  # a wrong reference fails before torch loads
    base_path = resolve_base(base, folder)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = pick_dtype(device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype, attn_implementation="sdpa")
    model = model.to(device)  # before the adapter: PEFT puts LoRA weights on the base layer's device
    info = {"base": base or base_path, "base_path": base_path, "adapter": adapter, "adapter_path": None,
            "lora_modules": 0, "merged": False, "device": str(device), "dtype": str(torch_dtype).split(".")[-1]}
    if folder is not None:
        model, counts = attach(model, folder, merge)
        info.update(adapter_path=str(folder), merged=merge, **counts)
    return model.eval(), tokenizer, info


def attach(model, folder: Path, merge: bool):
    """The model with the adapter applied (merged if asked) and the counts that prove it."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise EvalError(f"adapter {folder} does not fit the base model ({type(e).__name__}: {first}): "
                        "evaluate it with the base model it was trained on") from None
    counts = verify_lora(model, folder)
    return (model.merge_and_unload() if merge else model), counts


def verify_lora(model, folder: Path) -> dict:
    """Count LoRA modules and check every LoRA tensor of the adapter file landed in the model unchanged."""
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    n_modules = sum(isinstance(m, LoraLayer) and bool(m.lora_A) for m in model.modules())
    saved = _read_adapter_weights(folder)
    loaded = get_peft_model_state_dict(model)
    lora_keys = [k for k in saved if "lora_" in k]
    missing = [k for k in lora_keys if k not in loaded]
    differ = [k for k in lora_keys if k not in missing
              and not torch.equal(saved[k].to(loaded[k].dtype), loaded[k].detach().cpu())]
    if n_modules == 0 or not lora_keys or missing or differ:
        bad = (missing or differ or ["(none)"])[0]
        raise EvalError(f"adapter {folder} was not applied: {n_modules} LoRA modules in the model, "
                        f"{len(lora_keys)} LoRA tensors in the file, {len(missing)} missing and {len(differ)} "
                        f"different after loading (first: {bad}): check that it matches the base model")
    nonzero_b = sum(int(saved[k].abs().sum() > 0) for k in lora_keys if "lora_B" in k)
    return {"lora_modules": n_modules, "lora_tensors": len(lora_keys), "lora_b_nonzero": nonzero_b}


def _read_adapter_weights(folder: Path) -> dict:
    import torch

    if (folder / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file
        return load_file(str(folder / "adapter_model.safetensors"))
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise EvalError(f"adapter {folder} has no adapter_model.safetensors or .bin: the weights are missing")
