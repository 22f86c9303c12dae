"""The embedded base model: a tiny Llama with a real byte-level BPE tokenizer, built deterministically.

    python -m jobs.tiny            # build (or find) it and print its folder (and tiny-chat's)

No hub is needed: the tokenizer is trained on the bundled instruction sets and the weights are drawn from a
fixed seed, then saved in the Hugging Face layout (config.json, model.safetensors, tokenizer.json), so every
loader that takes a local folder takes it. The folder name carries a hash of the recipe below, so changing the
recipe builds a new model instead of silently reusing an old one. Writes are atomic (a temporary folder
renamed into place), so concurrent jobs that build it at once are safe.

`tiny-chat` (base_model: tiny-chat) is the same model whose tokenizer has a chat template, CHAT_TEMPLATE: a
Zephyr-style template whose assistant text sits in `{% generation %}` blocks, so that HF's own assistant mask
can check jobs/chat.py's (which needs no such blocks). Its markers (<|user|>...) are plain text, not new special
tokens: the vocabulary, and so the weights, stay those of `tiny`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
RECIPE = {
    "version": 1,
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "seed": 0,
    # a short full-parameter pretraining on plain text (jobs/tiny_data.corpus_sentences), so the base model
    # knows words and facts and LoRA has an instruction format to learn, as with a real base model
    "pretrain_sentences": 4000,
    "pretrain_steps": 150,
    "pretrain_row_tokens": 128,
    "pretrain_rows_per_step": 16,
    "pretrain_lr": 3e-3,
}
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
# newlines as {{ '\n' }}: HF renders with trim_blocks, which eats a newline written right after a block tag
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}")


def cache_root() -> Path:
    return Path(os.environ.get("LORA_HPO_CACHE", Path.home() / ".cache" / "lora-hpo"))


def tiny_model_dir() -> Path:
    """Folder of the tiny model, built on first use."""
    target = _tiny_target()
    if not (target / "config.json").exists():
        _build(target)
    return target


def tiny_model_built() -> bool:
    """Whether the tiny model is in the cache already (torch-free: the orchestrator says when the first job
    will spend a minute or two building it)."""
    return (_tiny_target() / "config.json").exists()


def _tiny_target() -> Path:
    sources = [*_corpus_files(), Path(__file__).with_name("tiny_data.py")]  # data and pretraining corpus
    corpus_hash = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:8]
    recipe_hash = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "models" / f"tiny-llama-{recipe_hash}-{corpus_hash}"


def tiny_chat_model_dir() -> Path:
    """Folder of tiny-chat: the tiny model, its tokenizer given CHAT_TEMPLATE; made on first use."""
    base = tiny_model_dir()
    digest = hashlib.sha256((base.name + CHAT_TEMPLATE).encode()).hexdigest()[:8]
    target = base.parent / f"tiny-chat-{digest}"
    if not (target / "config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        tokenizer.chat_template = CHAT_TEMPLATE

        def fill(tmp: Path) -> None:
            for f in base.iterdir():
                if not f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy2(f, tmp / f.name)
            tokenizer.save_pretrained(tmp)
        publish(target, fill)
    return target


def publish(target: Path, fill) -> None:
    """Make the model folder `target` whole or not at all: `fill(tmp)` writes it into a temporary sibling that
    replaces `target` atomically; if another process won the race (its folder is whole), keep theirs."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        fill(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _corpus_files() -> list[Path]:
    return sorted(ASSETS.glob("tiny_*.jsonl"))


def _corpus_lines():
    for path in _corpus_files():
        for line in path.read_text().splitlines():
            yield from (v for v in json.loads(line).values() if isinstance(v, str) and v)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from jobs.data import PROMPT_WITH_CONTEXT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # the prompt template is part of the corpus, so its words are single tokens as in a real tokenizer
    tok.train_from_iterator([PROMPT_WITH_CONTEXT, *_corpus_lines()], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL["bos"], eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"], model_max_length=RECIPE["max_position_embeddings"])


def _pretrain(model, tokenizer) -> None:
    """Next-token training of all weights on packed plain-text rows (fixed seed, fixed order)."""
    import torch

    from jobs.tiny_data import corpus_sentences

    ids = []
    for sentence in tokenizer(corpus_sentences(RECIPE["pretrain_sentences"]), add_special_tokens=False)["input_ids"]:
        ids += [tokenizer.bos_token_id, *sentence, tokenizer.eos_token_id]
    width = RECIPE["pretrain_row_tokens"]
    rows = torch.tensor(ids[: len(ids) // width * width]).view(-1, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["pretrain_lr"], weight_decay=0.0)
    steps, per_step = RECIPE["pretrain_steps"], RECIPE["pretrain_rows_per_step"]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(rows))
    model.train()
    for step in range(steps):
        pick = order[(torch.arange(per_step) + step * per_step) % len(rows)]
        loss = model(input_ids=rows[pick], labels=rows[pick]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()


def _build(target: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(RECIPE["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=RECIPE["hidden_size"],
        intermediate_size=RECIPE["intermediate_size"], num_hidden_layers=RECIPE["num_hidden_layers"],
        num_attention_heads=RECIPE["num_attention_heads"], num_key_value_heads=RECIPE["num_key_value_heads"],
        max_position_embeddings=RECIPE["max_position_embeddings"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(RECIPE["seed"])
    try:
        model = LlamaForCausalLM(config)
        _pretrain(model, tokenizer)
    finally:
        torch.random.set_rng_state(generator_state)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "RECIPE.json").write_text(json.dumps(RECIPE, indent=2) + "\n")
    publish(target, fill)


if __name__ == "__main__":
    print(tiny_model_dir())
    print(tiny_chat_model_dir())
