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

from jobs.spec import TINY_CHAT_MODEL, TINY_MODEL, FinetuneSpec


class TrainingFailure(RuntimeError):
    """An evaluation that failed for a reason that belongs in its result (diverged, no data...)."""


def load_base(name: str, device: torch.device, dtype: torch.dtype, **from_pretrained):
    """Tokenizer and causal LM from the tiny builder, a local HF-layout folder or a hub id (`from_pretrained`:
    more arguments for it, e.g. a quantization_config and device_map from jobs/strategies.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in (TINY_MODEL, TINY_CHAT_MODEL):
        from jobs.tiny import tiny_chat_model_dir, tiny_model_dir
        name = str(tiny_model_dir() if name == TINY_MODEL else tiny_chat_model_dir())
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise TrainingFailure(f"base model folder {name} does not exist: give a HF-layout folder or a hub id")
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.eos_token_id is None:
        raise TrainingFailure(f"tokenizer of {name} has no EOS token: the recipe appends EOS to every target")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="sdpa", **from_pretrained)
    except ValueError as e:  # an architecture without SDPA support (Gemma 2): its own default attention
        if "scaled_dot_product_attention" not in str(e):
            raise
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **from_pretrained)
    model.config.use_cache = False
    return tokenizer, model if "device_map" in from_pretrained else model.to(device)  # (4-bit models refuse .to)


def add_lora(model, spec: FinetuneSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                        target_modules=resolve_targets(model, spec.target_modules), bias="none",
                        task_type="CAUSAL_LM", use_rslora=spec.use_rslora, use_dora=spec.use_dora)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. a module type LoRA does not support
        raise TrainingFailure(f"LoRA could not be applied: {str(e).splitlines()[0]}: fix target_modules") from None


def linear_names(model) -> list[str]:
    """The names (last component) of the model's linear layers, the output head excepted: what LoRA may adapt."""
    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def attention_names(model) -> list[str]:
    """The names of the linear layers inside the attention blocks (q/k/v/o_proj on Llama, Mistral, Qwen2 and
    Gemma, query_key_value/dense on GPT-NeoX): found by the block's class, not by a table of architectures."""
    return sorted({child for _, block in model.named_modules() if type(block).__name__.endswith("Attention")
                   for child, m in block.named_children() if isinstance(m, torch.nn.Linear)})


def resolve_targets(model, targets) -> list[str] | str:
    """spec.target_modules for PEFT: "all-linear" as PEFT's own, "attention" as its module names, a list checked
    name by name (PEFT accepts a list as soon as one name matches: a typo would silently adapt less)."""
    if targets == "all-linear":
        return "all-linear"
    have = linear_names(model)
    wanted = attention_names(model) if targets == "attention" else list(targets)
    missing = [m for m in wanted if m not in have]
    if missing or not wanted:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise TrainingFailure(f"target_modules {missing or targets} not in this {kind} model, whose linear layers "
                              f"are {', '.join(have)}: list some of them, or use attention or all-linear")
    return wanted


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
