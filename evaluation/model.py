"""Load (base model, adapter) for evaluation, and prove the adapter is really in the model.

    from evaluation.model import load
    model, tokenizer, info = load("tiny", "runs/demo/adapter", dtype="fp32", merge=False)   # InstructEval's way

The adapter is a PEFT folder (or a fine-tune output folder holding adapter/), `runs:/RUN_ID/PATH` or
`models:/NAME@ALIAS` (downloaded from the given MLflow store through jobs.tracking_store). A wrong reference
is an `EvalError`, never a silent fallback to the base model. After loading, every LoRA tensor of the adapter
file must be in the model with the same values (a name mismatch leaves PEFT's fresh initialization, whose
B = 0 makes the adapter a no-op), and the number of LoRA-wrapped modules is recorded.

Precision. merge=False keeps the adapter as a separate branch (PEFT computes it in fp32 even on a bf16 base):
no update is lost. merge=True adds B @ A * alpha / r to the weights in fp32 and only then casts to `dtype`;
merging into weights already rounded to bf16 would drop every update smaller than half their rounding step
(the figure: evaluation/PROTOCOL.md, bench/merge_precision.py). `check_device` refuses a device or dtype this
machine cannot run, before anything loads.
"""
from __future__ import annotations

import json
from pathlib import Path

from evaluation.tasks.common import EvalError

TINY = "tiny"
DTYPES = ("fp32", "bf16", "fp16", "auto")


def resolve_adapter(ref: str, tracking_uri: str | None = None) -> Path:
    """A local PEFT folder for a path, a fine-tune output folder, runs:/... or models:/... (read from the store
    `tracking_uri`, resolved by jobs.tracking_store: explicit, else $MLFLOW_TRACKING_URI, else the project's)."""
    if ref.startswith(("models:/", "runs:/")):
        from jobs.tracking_store import download, resolve

        try:
            ref = download(ref, tracking_uri)
        except Exception as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise EvalError(f"adapter {ref} could not be downloaded from MLflow store {resolve(tracking_uri)} "
                            f"({first}): check the run id or model alias and the tracking URI") from None
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


def check_device(device: str | None = None, dtype: str = "fp32"):
    """(torch.device, torch.dtype) for the names given, or an EvalError when this machine cannot run them."""
    import torch

    if dtype not in DTYPES:
        raise EvalError(f"dtype {dtype!r} is unknown: choose one of {', '.join(DTYPES)}")
    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"device {name!r} is unknown: choose cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index or 0) >= count:
            raise EvalError(f"device {name!r} is not available here ({count} CUDA GPU(s) visible): choose cpu"
                            + (" or cuda:0..cuda:" + str(count - 1) if count else ", or run where a GPU is"))
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"device {name!r} is not available here: choose cpu")
    native_bf16 = dev.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)
    if dtype == "bf16" and not native_bf16:
        raise EvalError(f"dtype 'bf16' cannot run on {name} ({torch.cuda.get_device_name(dev)} has no native "
                        "bfloat16): choose fp32 or fp16")
    if dtype == "auto":
        dtype = "fp32" if dev.type == "cpu" else "bf16" if native_bf16 else "fp16"
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def load(base: str | None, adapter: str | None = None, device: str | None = None, dtype: str = "auto",
         merge: bool = True, tracking_uri: str | None = None, attn_implementation: str = "sdpa",
         tokenizer: str = "fast"):
    """(model in eval mode, tokenizer with left padding, info) - info records what was loaded and how.
    `attn_implementation` eager and `tokenizer` slow are InstructEval's (2023) choices."""
    folder = resolve_adapter(adapter, tracking_uri) if adapter else None  # a wrong reference fails before torch
    base_path = resolve_base(base, folder)
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.model import TrainingFailure, load_tokenizer

    device, torch_dtype = check_device(device, dtype)
    merge = bool(merge and folder is not None)
    # Merging happens in fp32: a lower dtype is loaded as fp32 on the CPU, merged, then cast and moved.
    staged = merge and torch_dtype != torch.float32
    try:
        tok = load_tokenizer(base_path, tokenizer)
    except TrainingFailure as e:
        raise EvalError(str(e)) from None
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32 if staged else torch_dtype,
                                                 attn_implementation=attn_implementation)
    model = model.to("cpu" if staged else device)  # before the adapter: PEFT puts LoRA on the layer's device
    info = {"base": base or base_path, "base_path": base_path, "adapter": adapter, "adapter_path": None,
            "lora_modules": 0, "merged": merge, "merge_dtype": "fp32" if merge else None, "device": str(device),
            "dtype": str(torch_dtype).split(".")[-1], "tokenizer_class": type(tok).__name__,
            "attn_implementation": model.config._attn_implementation}
    if folder is not None:
        model, counts = attach(model, folder, merge)
        info.update(adapter_path=str(folder), **counts)
    if staged:
        model = model.to(device=device, dtype=torch_dtype)
    return model.eval(), tok, info


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
