"""Tiny random-weight causal LMs of several architectures, built locally from their transformers configs.

    python -m jobs.tiny_arch              # build (or find) each one and print its folder

For the tests of "any causal LM" (tests/test_architectures.py): Llama, Mistral, Qwen2, Gemma, Gemma 2 and
GPT-NeoX at toy sizes, each with the tiny-chat tokenizer (jobs/tiny.py), saved in the Hugging Face layout like a
downloaded model, so the recipe loads them by folder as it loads a hub snapshot. The sizes make the
architectures' differences visible: grouped-query attention (fewer KV heads), Gemma's head_dim that is not
hidden / heads, Qwen2's biases, GPT-NeoX's fused query_key_value and its own module names, Gemma 2's logit
soft-capping. Weights are drawn from a fixed seed; nothing is pretrained (a loss that falls shows the
gradient path works, not that the model knows anything).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=1024)
ARCHS = {  # name: (config class, its arguments beyond COMMON)
    "llama": ("LlamaConfig", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2)),
    "gemma": ("GemmaConfig", dict(num_key_value_heads=1, head_dim=32)),
    "gemma2": ("Gemma2Config", dict(num_key_value_heads=2, head_dim=24, final_logit_softcapping=30.0)),
    "gpt_neox": ("GPTNeoXConfig", dict(rotary_pct=0.25)),
}
SEED = 0


def arch_model_dir(arch: str) -> Path:
    """Folder of the tiny `arch` model (a key of ARCHS), built on first use."""
    from jobs.tiny import cache_root, tiny_chat_model_dir

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHS)}")
    tokenizer_dir = tiny_chat_model_dir()
    recipe = json.dumps([arch, ARCHS[arch][0], ARCHS[arch][1], COMMON, SEED, tokenizer_dir.name], sort_keys=True)
    target = cache_root() / "models" / f"tiny-{arch}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    if not (target / "config.json").exists():
        _build(arch, tokenizer_dir, target)
    return target


def _build(arch: str, tokenizer_dir: Path, target: Path) -> None:
    import torch
    import transformers

    from jobs.tiny import publish

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config_class, extra = ARCHS[arch]
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **COMMON, **extra)
    state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(state)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    publish(target, fill)


if __name__ == "__main__":
    for name in ARCHS:
        print(name, arch_model_dir(name))
