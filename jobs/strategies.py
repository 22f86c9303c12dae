"""How a fine-tune holds its base model: every rank a whole copy (ddp), sharded across ranks (fsdp), or 4-bit (nf4).

    from jobs import strategies
    tokenizer, model = strategies.load(spec, device, dtype, rank, world)  # fsdp: rank 0 on CPU, others None
    held = strategies.hold(model, spec, device, dtype, rank, world, local_rank)
    held.model, held.loss_fn, held.forward(**batch), held.micro(last), held.sharded
    optimizer = strategies.make_optimizer(spec, trainable, device, held.sharded)
    grad_norm = strategies.clip(trainable, max_norm)                      # a plain tensor under fsdp too
    strategies.save_adapter(held.model, folder, rank)                     # PEFT format, every strategy

- **ddp** (default): every rank loads the whole base model; with several ranks DistributedDataParallel syncs the
  LoRA gradients. What the paper ran: right while the bf16 base fits one GPU next to its activations.
- **fsdp**: PyTorch's FSDP2 (`fully_shard`) shards every decoder layer and the root (embeddings, final norm,
  LM head) across all ranks of all nodes: each GPU holds 1/world of the frozen base, of the LoRA weights and of
  their AdamW state, and gathers one layer at a time. Loading never puts the whole model on every rank: rank 0
  reads the checkpoint into CPU memory, the others build the model on the meta device, and the shards are
  broadcast from rank 0 (torch.distributed.checkpoint.state_dict's broadcast_from_rank0). Gradient
  accumulation syncs once per optimizer step (set_requires_gradient_sync). With one rank it trains as ddp.
- **nf4** (QLoRA): the base's linear layers are stored as bitsandbytes 4-bit NormalFloat (optionally
  double-quantized) and computed in bf16 on GPU; peft's prepare_model_for_kbit_training keeps norms, embeddings
  and LM head in fp32 and freezes the base; LoRA weights are fp32. Held whole by every rank (ddp): a 70B base is
  ~35-40 GB in nf4 and fits one 48-80 GB GPU. bitsandbytes keeps each 4-bit weight's scales outside the tensor
  FSDP2 shards, so fsdp + nf4 is refused by the spec.

Checkpoints (jobs/checkpoint.py) are per-rank shard files under fsdp, written by each rank on its own, because
a job told to stop must save its last finished step at once and ranks get the signal at different points of a
step: a collective save (torch.distributed.checkpoint, or gathering to rank 0) inside a signal handler would
wait on ranks that are elsewhere. The adapter itself is gathered (all ranks at the end of training) and written
by rank 0 in PEFT format, the same files whatever the strategy.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from jobs.batches import ResponseLoss
from jobs.model import add_lora, load_base, load_tokenizer, train_embeddings
from jobs.spec import TINY_MODEL, FinetuneSpec


@dataclass
class Held:
    """The trainable model as the loop uses it."""
    model: object        # the peft.PeftModel (its parameters are DTensors under fsdp)
    loss_fn: ResponseLoss  # what validation calls (under fsdp: the sharded root module)
    forward: Callable      # what a training micro-batch calls (the DDP wrapper when there is one)
    micro: Callable        # micro(last) -> context: gradients are synced only in the last micro-batch
    sharded: bool
    embedding_params: int = 0  # trainable_embeddings: as_run: embedding weights that train with LoRA


def sharded(spec: FinetuneSpec, world: int) -> bool:
    return spec.strategy == "fsdp" and world > 1


def load(spec: FinetuneSpec, device: torch.device, dtype: torch.dtype, rank: int, world: int):
    """(tokenizer, base model): 4-bit on `device` for nf4; under fsdp the full model on rank 0's CPU (the source of
    the shards) and None elsewhere (hold() builds it on the meta device); otherwise on `device`."""
    if spec.quantization == "nf4":
        from transformers import BitsAndBytesConfig
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32  # bnb's CPU kernels: fp32 is exact
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                                    bnb_4bit_use_double_quant=spec.double_quant)
        tokenizer, model = load_base(spec.base_model, device, dtype, spec.attn_implementation, spec.tokenizer,
                                     quantization_config=config,
                                     device_map={"": device.index if device.type == "cuda" else "cpu"})
        if device.type == "cpu":
            same_kernel_on_every_cpu(model)
        return tokenizer, model
    if sharded(spec, world):
        if rank == 0:
            return load_base(spec.base_model, torch.device("cpu"), dtype, spec.attn_implementation, spec.tokenizer)
        return load_tokenizer(_path(spec.base_model), spec.tokenizer), None
    return load_base(spec.base_model, device, dtype, spec.attn_implementation, spec.tokenizer)


def same_kernel_on_every_cpu(model) -> int:
    """Turn off bitsandbytes' packed 4-bit inference path on CPUs with AVX512-BF16 (bnb >= 0.49: a Linear4bit in
    eval mode without gradients repacks its weight and computes in bf16). It asserts out_features % 32 == 0 (the
    tiny preset's layers are not), and it would make a validation loss depend on the CPU the job landed on; the
    fp32 dequantize-then-matmul path is exact and the same everywhere. Returns the layers changed."""
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def hold(model, spec: FinetuneSpec, device: torch.device, dtype: torch.dtype, rank: int, world: int,
         local_rank: int, tokenizer=None) -> Held:
    """LoRA on the base, gradient checkpointing if asked, the authors' trainable embeddings if asked
    (trainable_embeddings: as_run, ddp only: before DDP registers what trains), and the strategy's wrapping."""
    if sharded(spec, world):
        return _fsdp(model, spec, device, dtype, rank)
    if spec.quantization == "nf4":
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        for module in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
            module.to(dtype)  # as QLoRA's own recipe: norms in fp32, embeddings and LM head in the compute dtype
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_lora(model, spec)
    embedding_params = train_embeddings(model, tokenizer) if spec.trainable_embeddings == "as_run" else 0
    model.train()
    loss_fn = ResponseLoss(model)
    if world == 1:
        return Held(model, loss_fn, loss_fn, lambda last: contextlib.nullcontext(), False, embedding_params)
    ddp = torch.nn.parallel.DistributedDataParallel(loss_fn, device_ids=[local_rank] if device.type == "cuda"
                                                    else None)
    return Held(model, loss_fn, ddp, lambda last: contextlib.nullcontext() if last else ddp.no_sync(), False,
                embedding_params)


def _fsdp(source, spec: FinetuneSpec, device: torch.device, dtype: torch.dtype, rank: int) -> Held:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = add_lora(source, spec).state_dict() if rank == 0 else {}  # rank 0: the weights and the LoRA init
    del source
    model = add_lora(_meta_model(spec.base_model, dtype), spec)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    buffers = {name: b.clone() for name, b in model.named_buffers()}  # real (rotary tables), not in state_dict
    loss_fn = ResponseLoss(model)
    # bf16 base + fp32 LoRA in one group: gathered in bf16, gradients reduced in fp32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == torch.bfloat16 else MixedPrecisionPolicy()
    inner = model.get_base_model()
    units = list(inner.model.layers)
    if not inner.config.tie_word_embeddings:  # gathered only while used (a 128k vocabulary's head is 2 GB in bf16)
        units += [inner.get_input_embeddings(), inner.get_output_embeddings()]
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(loss_fn, mp_policy=mp)  # the root: the final norm (and tied embeddings); ResponseLoss calls them
    loss_fn.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    model.train()

    @contextlib.contextmanager
    def micro(last: bool):
        loss_fn.set_requires_gradient_sync(last)  # accumulate unsharded LoRA gradients; reduce-scatter at the last
        yield

    return Held(model, loss_fn, loss_fn, micro, True)


def _path(name: str) -> str:
    if name == TINY_MODEL:
        from jobs.tiny import tiny_model_dir
        return str(tiny_model_dir())
    return name


def _meta_model(name: str, dtype: torch.dtype):
    """The model's structure with its parameters on the meta device (no memory) and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_path(name))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.name_or_path = config._name_or_path  # what the adapter's config names as its base model
    return model


def make_optimizer(spec: FinetuneSpec, params: list, device: torch.device, is_sharded: bool):
    """torch AdamW, or a bitsandbytes AdamW (8-bit state: a quarter of the memory; paged: evicted to CPU memory
    under GPU memory pressure instead of failing). "auto": paged AdamW for nf4 on GPU (QLoRA's), else AdamW."""
    name = spec.optimizer
    if name == "auto":
        name = "paged_adamw" if spec.quantization and device.type == "cuda" else "adamw"
    if name == "adamw":
        # fused: one kernel for all LoRA tensors on GPU; DTensor parameters take the default (foreach) path
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay,
                                 fused=device.type == "cuda" and not is_sharded)
    import bitsandbytes as bnb
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=spec.lr, weight_decay=spec.weight_decay)


def clip(params: list, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_, whose total norm is a (replicated) DTensor when the gradients are sharded."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_adapter_state(model) -> dict:
    """{name: full tensor on CPU} of the trainable (LoRA) parameters; a collective under fsdp (every rank)."""
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
            for n, p in model.named_parameters() if p.requires_grad}


def save_adapter(model, folder: Path, rank: int) -> None:
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors), written whole or not at all
    by rank 0. Under fsdp the LoRA shards are gathered first (every rank must call this)."""
    state = full_adapter_state(model) if any(hasattr(p, "full_tensor") for p in model.parameters()) else None
    if rank != 0:
        return
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    # the adapter only (trainable_embeddings: as_run too, as the authors' run saved it)
    if state is None:
        model.save_pretrained(tmp, save_embedding_layers=False)
    else:
        model.save_pretrained(tmp, state_dict=state, save_embedding_layers=False)
    os.replace(tmp, folder)


def count_params(model) -> int:
    """Parameters of the model as trained: global sizes under fsdp, two 4-bit weights per stored byte under nf4."""
    return sum(p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1) for p in model.parameters())
