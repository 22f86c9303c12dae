"""The base model, LoRA and the device setup of a fine-tune (jobs/finetune.py's recipe imports them).

    from jobs.model import load_base, add_lora, distributed_env, pick_precision
    rank, world, local_rank = distributed_env()           # torchrun, or a multi-task submitit job
    tokenizer, model = load_base("tiny", torch.device("cpu"), torch.float32)
    model = add_lora(model, spec)                           # peft.PeftModel, LoRA on spec.target_modules

The options that reproduce the authors' run (jobs/spec.py; evaluation/PROTOCOL.md says what each changes):
load_base(..., attn_implementation="eager", tokenizer="slow"), pick_precision / autocast_for with
precision fp32_autocast_bf16, and add_pad_token + train_embeddings for trainable_embeddings: as_run.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from jobs.spec import TINY_CHAT_MODEL, TINY_MODEL, FinetuneSpec


class TrainingFailure(RuntimeError):
    """An evaluation that failed for a reason that belongs in its result (diverged, no data...)."""


def load_base(name: str, device: torch.device, dtype: torch.dtype, attn_implementation: str = "sdpa",
              tokenizer: str = "fast", **from_pretrained):
    """Tokenizer (fast, or the slow SentencePiece one) and causal LM (SDPA or eager attention) from the tiny
    builder, a local HF-layout folder or a hub id (`from_pretrained`: more arguments for it, e.g. a
    quantization_config and device_map from jobs/strategies.py)."""
    from transformers import AutoModelForCausalLM

    if name in (TINY_MODEL, TINY_CHAT_MODEL):
        from jobs.tiny import tiny_chat_model_dir, tiny_model_dir
        name = str(tiny_model_dir() if name == TINY_MODEL else tiny_chat_model_dir())
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise TrainingFailure(f"base model folder {name} does not exist: give a HF-layout folder or a hub id")
    tok = load_tokenizer(name, tokenizer)
    if tok.eos_token_id is None:
        raise TrainingFailure(f"tokenizer of {name} has no EOS token: the recipe appends EOS to every target")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn_implementation,
                                                     **from_pretrained)
    except ValueError as e:  # an architecture without SDPA support (Gemma 2): its own default attention
        if attn_implementation != "sdpa" or "scaled_dot_product_attention" not in str(e):
            raise
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **from_pretrained)
    model.config.use_cache = False
    return tok, model if "device_map" in from_pretrained else model.to(device)  # (4-bit models refuse .to)


def load_tokenizer(name: str, kind: str = "fast"):
    """The fast (Rust) tokenizer, or with kind="slow" the SentencePiece one the authors' script and InstructEval
    loaded (use_fast=False). transformers 4.x returns it for use_fast=False; transformers 5 ignores use_fast and
    always builds the fast one, so the SentencePiece backend is asked for by name (it reads tokenizer.model)."""
    from transformers import AutoTokenizer

    if kind == "fast":
        return AutoTokenizer.from_pretrained(name)
    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=False)
        if not tok.is_fast:
            return tok
        return _sentencepiece_tokenizer().from_pretrained(name)
    except (ImportError, OSError, ValueError, TypeError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise TrainingFailure(f"tokenizer: slow needs the sentencepiece package and a SentencePiece tokenizer.model "
                              f"in {name} ({type(e).__name__}: {first}): install sentencepiece, or use tokenizer: "
                              "fast") from None


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


@functools.lru_cache(maxsize=1)
def _sentencepiece_tokenizer():
    """transformers 5's SentencePiece backend, decoding as the slow LlamaTokenizer did: runs of pieces through
    sp_model.decode (byte-fallback pieces such as <0x0A> become their bytes, the first piece's word-start
    space is dropped), special tokens as they are. The backend's own decoding joins the pieces as text."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class SentencePieceTokenizer(SentencePieceBackend):
        def convert_tokens_to_string(self, tokens: list[str]) -> str:
            text, run = "", []
            for token in tokens:
                if token in self.all_special_tokens:
                    text, run = text + self.sp_model.decode(run) + token, []
                else:
                    run.append(token)
            return text + self.sp_model.decode(run)

    return SentencePieceTokenizer


def pick_precision(spec: FinetuneSpec, device: torch.device) -> torch.dtype:
    """The dtype the base weights are loaded in (tf32 allowed on a GPU for the bf16 and autocast choices)."""
    mixed = spec.precision == "fp32_autocast_bf16"
    if mixed or spec.precision == "bf16" or (spec.precision == "auto" and device.type == "cuda"):
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return torch.float32 if mixed else torch.bfloat16
    return torch.float32


def autocast_for(spec: FinetuneSpec, device: torch.device, dtype: torch.dtype):
    """The context every forward pass runs in. bf16 weights on a GPU: bf16 autocast (the norms and softmax stay
    fp32). fp32_autocast_bf16: fp32 weights under bf16 autocast, as the HF Trainer's --bf16 ran the authors'
    fp32-loaded model; on a CPU as well (torch's CPU autocast takes bf16), so that a test sees it run.
    Otherwise none."""
    from contextlib import nullcontext

    if spec.precision == "fp32_autocast_bf16" or (dtype == torch.bfloat16 and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


AS_RUN_PAD = "[PAD]"  # the authors' script (Stanford Alpaca's DEFAULT_PAD_TOKEN)


def add_pad_token(tokenizer) -> int:
    """trainable_embeddings: as_run, before tokenizing: the authors' script adds [PAD] when the tokenizer has no
    pad token (Llama-2's has none). Returns the number of tokens added (0 or 1)."""
    if tokenizer.pad_token is not None:
        return 0
    return tokenizer.add_special_tokens({"pad_token": AS_RUN_PAD})


def train_embeddings(model, tokenizer) -> int:
    """trainable_embeddings: as_run, after LoRA is applied: what the authors' smart_tokenizer_and_embedding_resize
    did to Llama-2 with the transformers of 2023. Rows are added for tokens the tokenizer has beyond the
    embedding matrix, set to the mean of the old rows (input and output embeddings alike), and the resized
    embed_tokens and lm_head weights train: before transformers 4.35 (huggingface/transformers#26865) a
    resize built new modules with requires_grad=True, so the HF Trainer optimized them with the LoRA weights.
    Set explicitly here, as today's resize keeps them frozen. Returns the number of embedding parameters that
    now train."""
    inner = model.get_base_model()
    old = inner.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        # mean_resizing=False: the new rows get the authors' plain mean below, not transformers' random draw
        inner.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for weight in (inner.get_input_embeddings().weight, inner.get_output_embeddings().weight):
                weight[old:] = weight[:old].mean(dim=0, keepdim=True)
    weights = {id(w): w for w in (inner.get_input_embeddings().weight, inner.get_output_embeddings().weight)}
    for w in weights.values():  # tied embeddings (not Llama's) are one matrix: counted once
        w.requires_grad_(True)
    return sum(w.numel() for w in weights.values())
