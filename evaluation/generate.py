"""Text generation for the benchmarks: batched (ours) and one example at a time (the reference's way).

    outputs = generate(model, tokenizer, prompts, max_new_tokens=32, stop=task.stop, batch_size=16)

Batched: prompts sorted by token length (longest first, so an out-of-memory shows at once and padding stays
small), left-padded with an attention mask, KV cache on, and a per-row stop rule checked on the decoded
text, so a row ends as soon as later tokens cannot change its score (the batch ends when all rows have).
An out-of-memory batch is split in two and retried. Greedy unless `temperature` > 0; sampling (with the given
top-k, 0 = none, and top-p) is seeded per batch. Outputs are decoded without special tokens, in input order.

Decoding means what the arguments say, whatever the checkpoint's generation_config.json holds: generate()
fills the fields a call leaves at a default from the model's own generation_config (transformers 4.50-4.57:
any field *equal* to its default, so do_sample=False became the file's do_sample=True; transformers 5: any
field left None, e.g. the file's repetition_penalty). So the GenerationConfig is built whole here and, for
the call, is also the model's own (`_only`): nothing is left to fill from the file. The reference protocol
reads the file once (evaluation.runner.resolve_decoding) and passes what it says, explicitly (`extra`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

# Settings of a checkpoint's generation_config besides the sampling ones that change greedy and sampled
# outputs alike, with their neutral values: `decoding: reference` follows the file's (InstructEval called
# generate() without them, so the file decided), greedy and sampling use these.
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
           "eta_cutoff": 0.0}


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids with BOS first, as Llama's tokenizer gives them (the tiny tokenizer adds no BOS itself)."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is None:
        return ids
    return [row if row[:1] == [bos] else [bos, *row] for row in ids]


def token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    return lambda texts: [len(row) for row in encode(tokenizer, texts)]


def _config(tokenizer, max_new_tokens: int, temperature: float, suppress_eos: bool = False, top_p: float = 1.0,
            top_k: int = 50, extra: dict | None = None):
    """The whole decoding: greedy (temperature 0) or sampling, the NEUTRAL settings unless `extra` names others."""
    from transformers import GenerationConfig

    sample = temperature > 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, num_return_sequences=1, use_cache=True,
        suppress_tokens=[tokenizer.eos_token_id] if suppress_eos else None,
        temperature=temperature if sample else None, top_k=top_k if sample else None,
        top_p=top_p if sample else None, **{**NEUTRAL, **(extra or {})},
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)


@contextlib.contextmanager
def _only(model, config):
    """`config` is the model's own generation_config during the call, so generate() has nothing to fill in from
    the checkpoint's file (whichever rule the installed transformers applies); the file's is restored after.
    A PEFT model generates through its base model and copies its own (the base's) config there first."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = config
    try:
        yield config
    finally:
        inner.generation_config = saved


def _stopper(tokenizer, prompt_len: int, stop: Callable[[str], bool]):
    import torch
    from transformers import StoppingCriteria

    class StopRule(StoppingCriteria):
        """Per row: True once `stop` holds for its decoded new text; finished rows are not decoded again."""

        done = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None:
                self.done = [False] * input_ids.shape[0]
            rows = [i for i, d in enumerate(self.done) if not d]
            texts = tokenizer.batch_decode(input_ids[rows, prompt_len:], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                self.done[i] = stop(text)
            return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    return StopRule()


def _run_batch(model, tokenizer, rows: list[list[int]], max_new_tokens: int, stop, temperature: float,
               seed: int, suppress_eos: bool, top_p: float, top_k: int, extra: dict | None) -> list[str]:
    import torch

    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    criteria = [_stopper(tokenizer, width, stop)] if stop else None
    if temperature > 0:
        torch.manual_seed(seed)
    config = _config(tokenizer, max_new_tokens, temperature, suppress_eos, top_p, top_k, extra)
    with torch.inference_mode(), _only(model, config):
        out = model.generate(input_ids=input_ids, attention_mask=mask, stopping_criteria=criteria,
                             generation_config=config)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, stop: Optional[Callable[[str], bool]] = None,
             batch_size: int = 8, temperature: float = 0.0, seed: int = 0, progress=None,
             suppress_eos: bool = False, top_p: float = 1.0, top_k: int = 50, extra: dict | None = None) -> list[str]:
    """Completions of `prompts`, in their order; `progress(n_done)` is called after each batch.
    `suppress_eos` (benchmarks and tests) makes a model that stops early use its budget like a rambling one;
    `extra` sets NEUTRAL's settings otherwise (decoding: reference, from the checkpoint's file)."""
    import torch

    ids = encode(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    outputs: list[str] = [""] * len(ids)
    pending = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    done = 0
    while pending:
        batch = pending.pop(0)
        try:
            texts = _run_batch(model, tokenizer, [ids[i] for i in batch], max_new_tokens, stop, temperature,
                               seed + batch[0], suppress_eos, top_p, top_k, extra)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            pending[:0] = [batch[:len(batch) // 2], batch[len(batch) // 2:]]
            continue
        for i, text in zip(batch, texts):
            outputs[i] = text
        done += len(batch)
        if progress:
            progress(done)
    return outputs


def generate_one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                        seed: int = 0, suppress_eos: bool = False, top_p: float = 1.0, top_k: int = 50,
                        extra: dict | None = None) -> list[str]:
    """The reference's way: one prompt per generate call, no padding, no stop rule beyond EOS."""
    import torch

    outputs = []
    config = _config(tokenizer, max_new_tokens, temperature, suppress_eos, top_p, top_k, extra)
    for i, row in enumerate(encode(tokenizer, prompts)):
        if temperature > 0:
            torch.manual_seed(seed + i)
        with torch.inference_mode(), _only(model, config):
            out = model.generate(input_ids=torch.tensor([row], device=model.device),
                                 attention_mask=torch.ones(1, len(row), dtype=torch.long, device=model.device),
                                 generation_config=config)
        outputs.append(tokenizer.decode(out[0, len(row):], skip_special_tokens=True))
    return outputs
