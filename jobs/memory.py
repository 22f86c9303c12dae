"""Peak GPU memory per rank of one fine-tune, known before it is submitted (torch-free: the orchestrator imports it).

    python -m jobs.memory --preset paper --world-size 4          # the estimate and its parts, in GiB
    python -m jobs.memory --spec runs/s/trials/3/spec.json --world-size 16

    from jobs.memory import estimate_spec
    estimate_spec(spec_dict, world_size=8)   # {"peak_gb", "device_gb", "parts"}, or None for an unknown model

The formula, in bytes per rank. h hidden size, i intermediate size, kv = key/value heads x head size, L layers,
V vocabulary, P parameters of the base, W ranks (world size), n = per_device_batch x max_seq_len tokens in a
micro-batch (every row padded to the longest: an upper bound), e = 2 (bf16) or 4 (fp32) bytes:

- base weights: ddp P e. nf4: the decoder's linear weights at 4 bits plus their scales (0.5 + 4/64 bytes per
  weight, 0.5 + 1/64 + 4/(64 x 256) with double quantization), norms in fp32, embeddings and LM head in e
  (QLoRA's own recipe), plus one linear weight dequantized at a time (e x its size). fsdp: P e / W, plus two
  decoder layers gathered whole (the one computing and the one prefetched) and the LM head gathered for the loss.
- LoRA: T = L x sum over the targets of r (in + out) trainable weights, kept in fp32: weights 4T, gradients 4T,
  AdamW moments 8T (8-bit AdamW 2T); DDP's gradient buckets 4T more; fsdp divides all of it by W and keeps the
  gradients unsharded between syncs when grad_accum > 1 (4T).
- activations, per token and decoder layer: 12h + 6i + 4kv bytes in bf16 (the normed inputs, kept in fp32 and
  bf16 by RMSNorm, queries, attention output, gate, up and SiLU outputs, keys and values) + 4 bytes per attention
  head (SDPA's log-sum-exp), + per LoRA target 2 in + 2 r (its bf16 input and rank-r output), + 1 in with LoRA
  dropout (its mask). Measured on this recipe's own model code with torch's saved-tensor hooks (Llama layers of
  several shapes; the fit is exact to 8 bytes per token and layer). x L layers; with gradient checkpointing only
  each layer's input (e h) is kept, plus one layer's full set while it is recomputed in the backward pass.
- loss: the LM head runs on response tokens only; their logits in bf16, an fp32 copy and its gradient: 10 n V
  bytes (every token a response token: an upper bound).

`peak_gb` is what torch.cuda.max_memory_allocated reports (the recipe's `peak_memory_bytes`); `device_gb` adds the
caching allocator's slack (10%) and the CUDA context (0.6 GiB): what the GPU must have. The estimate is checked
against published figures in tests/test_memory.py (with the error on each) and against the GPU tier's
measurements (tests/test_gpu.py) where a GPU is lent.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2 ** 30
CONTEXT_GIB = 0.6  # CUDA context and cuBLAS workspace: outside torch's allocator
ALLOCATOR_SLACK = 0.10  # the caching allocator's fragmentation: reserved over allocated at the peak
TARGET_ALIASES = {"all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  "attention": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # FinetuneSpec.target_modules' names


@dataclass(frozen=True)
class Shape:
    """A decoder-only (Llama-style) model's dimensions."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def dims(self, target: str) -> tuple[int, int]:
        """(in, out) features of a target module."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        table = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        if target not in table:
            raise ValueError(f"target module {target!r} is not one the memory model knows: use {', '.join(table)}")
        return table[target]

    def linear_params(self) -> int:  # per decoder layer
        return sum(a * b for a, b in map(self.dims, TARGET_ALIASES["all-linear"]))

    def params(self) -> int:
        return self.layers * (self.linear_params() + 2 * self.hidden) + self.hidden + \
            self.vocab * self.hidden * (1 if self.tied else 2)


# Shapes of hub models (from their config.json), so that a study can be sized without downloading anything.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": Shape(4096, 11008, 32, 32, 32, 32000),
    "meta-llama/Llama-2-13b-hf": Shape(5120, 13824, 40, 40, 40, 32000),
    "meta-llama/Llama-2-70b-hf": Shape(8192, 28672, 80, 64, 8, 32000),
    "huggyllama/llama-65b": Shape(8192, 22016, 80, 64, 64, 32000),
    "meta-llama/Llama-3.1-8B": Shape(4096, 14336, 32, 32, 8, 128256),
    "meta-llama/Llama-3.1-70B": Shape(8192, 28672, 80, 64, 8, 128256),
    "meta-llama/Llama-3.3-70B-Instruct": Shape(8192, 28672, 80, 64, 8, 128256),
    "mistralai/Mistral-7B-v0.1": Shape(4096, 14336, 32, 32, 8, 32000),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": Shape(2048, 5632, 22, 32, 4, 32000),
}
KNOWN["Qwen/Qwen2.5-7B"] = Shape(3584, 18944, 28, 28, 4, 152064)  # examples/chat/study.yaml's model
KNOWN["Qwen/Qwen2.5-7B-Instruct"] = KNOWN["Qwen/Qwen2.5-7B"]
KNOWN["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN["meta-llama/Llama-3.1-8B"]
KNOWN["meta-llama/Llama-3.1-70B-Instruct"] = KNOWN["meta-llama/Llama-3.1-70B"]


def shape_from_config(config: dict) -> Shape:
    return Shape(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                 config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"],
                 config["vocab_size"], bool(config.get("tie_word_embeddings", False)))


def model_shape(name: str) -> Shape | None:
    """The base model's shape: the tiny recipe, a local folder's config.json, the Hugging Face cache, or KNOWN."""
    if name in ("tiny", "tiny-chat"):  # tiny-chat: the same model, its tokenizer given a chat template
        from jobs.tiny import RECIPE
        return shape_from_config({**RECIPE, "tie_word_embeddings": False})
    folder = Path(name).expanduser()
    candidates = [folder / "config.json"]
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" /
                                                                     "huggingface")) / "hub")
    candidates += sorted((hub / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    for path in candidates:
        try:
            return shape_from_config(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError):
            continue
    return KNOWN.get(name)


def estimate(shape: Shape, *, r: int, targets, per_device_batch: int, max_seq_len: int, precision: str = "bf16",
             strategy: str = "ddp", world_size: int = 1, quantization: str | None = None, double_quant: bool = True,
             gradient_checkpointing: bool = False, optimizer: str = "adamw", dropout: float = 0.0,
             grad_accum: int = 1, lora_bytes: int = 4, loss_chunks: int = 1) -> dict:
    """Peak GPU memory of one rank, in GiB, and its parts. The defaults are this recipe; other recipes differ in
    three settings, for comparisons: precision fp32-master (fp32 weights, bf16 compute: FSDP mixed precision),
    lora_bytes 2 (LoRA weights and gradients in bf16: QLoRA's and torchtune's recipes), loss_chunks k (the loss
    computed k chunks of tokens at a time, as torchtune's CEWithChunkedOutputLoss does: only the bf16 logits stay
    whole)."""
    e_w = 4 if precision in ("fp32", "fp32-master") else 2
    e = 4 if precision == "fp32" else 2
    targets = [t for name in _names(targets) for t in TARGET_ALIASES.get(name, [name])]
    dims = [shape.dims(t) for t in targets]
    h, L, V, W = shape.hidden, shape.layers, shape.vocab, world_size
    sharded = strategy == "fsdp" and W > 1
    lora_layer = sum(r * (a + b) for a, b in dims)
    T = L * lora_layer
    parts = {}

    linear = L * shape.linear_params()
    rest = shape.params() - linear
    if quantization == "nf4":
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)
        norms = L * 2 * h + h
        rest_bytes = (rest - norms) * e + norms * 4
        parts["base_weights"] = (linear * per_weight + rest_bytes) / (W if sharded else 1)
        parts["dequantized_weight"] = e * max(a * b for a, b in map(shape.dims, TARGET_ALIASES["all-linear"]))
        layer_bytes = shape.linear_params() * per_weight
    else:
        parts["base_weights"] = shape.params() * e_w / (W if sharded else 1)
        layer_bytes = shape.linear_params() * e
    if sharded:  # two layers gathered (bf16 compute copies with their LoRA weights), the LM head for the loss
        parts["gathered"] = 2 * (layer_bytes + lora_layer * e) + V * h * e

    optim = 2 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    if sharded:
        parts["lora"] = T * (2 * lora_bytes + optim) / W + (lora_bytes * T if grad_accum > 1 else 0)
    else:
        parts["lora"] = T * (2 * lora_bytes + optim + (lora_bytes if W > 1 else 0))

    n = per_device_batch * max_seq_len
    layer = layer_activation_bytes(shape, targets, r, e, dropout)
    parts["activations"] = n * (L * e * h + layer if gradient_checkpointing else L * layer)
    parts["loss"] = n * V * (e + 8 / loss_chunks)
    peak = sum(parts.values())
    return {"peak_gb": peak / GIB, "device_gb": peak * (1 + ALLOCATOR_SLACK) / GIB + CONTEXT_GIB,
            "parts": {k: round(v / GIB, 3) for k, v in parts.items()}, "trainable_params": T,
            "base_params": shape.params()}


def layer_activation_bytes(shape: Shape, targets, r: int, e: int = 2, dropout: float = 0.0,
                           lora_input_bytes: int | None = None, dropout_bytes: int = 1) -> float:
    """Bytes kept for the backward pass per token by one decoder layer (see the module docstring). On a GPU under
    bf16 autocast each LoRA target keeps a bf16 copy of its input (e bytes) and a 1-byte dropout mask; on a CPU,
    without autocast, peft's cast of the input to the fp32 adapter keeps 4 bytes, and dropout 4 more (the
    measurement in tests/test_memory.py passes 4 and 4)."""
    dims = [shape.dims(t) for name in _names(targets) for t in TARGET_ALIASES.get(name, [name])]
    base = (12 * shape.hidden + 6 * shape.intermediate + 4 * shape.kv) * e / 2 + 4 * shape.heads
    per_input = lora_input_bytes or e
    return base + sum(per_input * a + per_input * r + (dropout_bytes * a if dropout > 0 else 0) for a, _ in dims)


def _names(targets) -> list:
    """target_modules as a list: the spec's "all-linear" / "attention" are one name, not a string's letters."""
    return [targets] if isinstance(targets, str) else list(targets)


def world_size(resources: dict) -> int:
    """Ranks of a trial: nodes x tasks per node (one task per GPU unless tasks_per_node says otherwise)."""
    tasks = resources.get("tasks_per_node") or max(1, resources.get("gpus_per_node") or 0)
    return (resources.get("nodes") or 1) * tasks


def estimate_spec(spec: dict, world_size: int = 1) -> dict | None:
    """estimate() for a fine-tune spec (a FinetuneSpec's dict) on `world_size` ranks; None when the base model's
    shape is unknown here (a hub id not in KNOWN and not in the local Hugging Face cache)."""
    shape = model_shape(spec.get("base_model", "tiny"))
    if shape is None:
        return None
    precision = {"auto": "bf16"}.get(spec.get("precision", "auto"), spec.get("precision", "auto"))
    return estimate(shape, r=spec.get("r", 8), targets=spec.get("target_modules", ["q_proj", "v_proj"]),
                    per_device_batch=spec.get("per_device_batch", 4), max_seq_len=spec.get("max_seq_len", 512),
                    precision=precision, strategy=spec.get("strategy", "ddp"), world_size=world_size,
                    quantization=spec.get("quantization"), double_quant=spec.get("double_quant", True),
                    gradient_checkpointing=spec.get("gradient_checkpointing", False),
                    optimizer=spec.get("optimizer", "auto"), dropout=spec.get("dropout", 0.0),
                    grad_accum=spec.get("grad_accum", 1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Peak GPU memory per rank of a fine-tune, before it runs.")
    parser.add_argument("--spec", help="a spec.json")
    parser.add_argument("--preset", default="tiny", help="tiny or paper (when no --spec)")
    parser.add_argument("--world-size", type=int, default=1, help="ranks: nodes x tasks per node")
    args, overrides = parser.parse_known_args(argv)
    from jobs.spec import FinetuneSpec, SpecError, preset
    try:
        spec = FinetuneSpec.from_json(args.spec) if args.spec else preset(args.preset)
        for item in overrides:  # --key=value, e.g. --strategy=fsdp --r=64
            key, _, value = item.lstrip("-").partition("=")
            spec = spec.replace(**{key.replace("-", "_"): json.loads(value) if value[:1] in "0123456789[{tfn"
                                   else value})
    except (SpecError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = estimate_spec(spec.to_dict(), args.world_size)
    if result is None:
        print(f"error: the shape of {spec.base_model} is unknown here: give a local folder with config.json",
              file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
