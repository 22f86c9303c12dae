"""The base model, LoRA and the device setup of a fine-tune (jobs/finetune.py's recipe imports them).

    from jobs.model import load_base, add_lora, distributed_env, pick_precision
    rank, world, local_rank = distributed_env()           # torchrun, or a multi-task submitit job
    tokenizer, model = load_base("tiny", torch.device("cpu"), torch.float32)
    model = add_lora(model, spec)                           # peft.PeftModel, LoRA on spec.target_modules
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from jobs.spec import TINY_MODEL, FinetuneSpec


class TrainingFailure(RuntimeError):
    """An evaluation that failed for a reason that belongs in its result (diverged, no data...)."""


def load_base(name: str, device: torch.device, dtype: torch.dtype, **from_pretrained):
    """Tokenizer and causal LM from the tiny builder, a local HF-layout folder or a hub id (`from_pretrained`:
    more arguments for it, e.g. a quantization_config and device_map from jobs/strategies.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY_MODEL:
        from jobs.tiny import tiny_model_dir
        name = str(tiny_model_dir())
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise TrainingFailure(f"base model folder {name} does not exist: give a HF-layout folder or a hub id")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise TrainingFailure(f"tokenizer of {name} has no EOS token: the recipe appends EOS to every target")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **from_pretrained)
    model.config.use_cache = False
    return tokenizer, model if "device_map" in from_pretrained else model.to(device)  # (4-bit models refuse .to)


def add_lora(model, spec: FinetuneSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=list(spec.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the base model
        raise TrainingFailure(f"LoRA could not be applied: {str(e).splitlines()[0]}: fix target_modules") from None


def distributed_env() -> tuple[int, int, int]:
    """(rank, world size, local rank); initializes torch.distributed under torchrun or a multi-task job."""
    tasks = os.environ.get("SLURM_NTASKS") or os.environ.get("SUBMITIT_LOCAL_NTASKS") or "1"  # slurm, local executor
    if "RANK" not in os.environ and int(tasks) > 1 and "SUBMITIT_FOLDER" in os.environ:
        import submitit
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def pick_precision(spec: FinetuneSpec, device: torch.device) -> torch.dtype:
    if spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda"):
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch.bfloat16
    return torch.float32
