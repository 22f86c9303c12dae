"""Batches and losses of the recipe (jobs/finetune.py): how examples become micro-batches, the response-only loss,
and the validation passes (final, and intermediate at fractions of training for pruning).

    from jobs.batches import epoch_plan, collate, ResponseLoss, validation_loss
"""
from __future__ import annotations

import math

import numpy as np
import torch

from jobs import data as D
from jobs.spec import FinetuneSpec


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [batch, longest] ids and labels (padding labelled IGNORE)."""
    width = max(len(ids) for ids, _ in examples)
    ids = [e + [pad_id] * (width - len(e)) for e, _ in examples]
    labels = [lab + [D.IGNORE] * (width - len(lab)) for _, lab in examples]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def loss_tokens(example) -> int:
    return sum(1 for t in example[1][1:] if t != D.IGNORE)  # labels are shifted by one against the logits


def epoch_plan(lengths: list[int], spec: FinetuneSpec, world: int, epoch: int) -> list[list[list[int]]]:
    """Optimizer steps of one epoch; each is a list of micro-batches (example indices), rank r taking every
    world-th. Length grouping as HF's group_by_length: shuffle, sort by length within windows of
    `group_window` micro-batches, cut, shuffle the micro-batches (0: sort only within each step, whose
    sample then stays uniformly random). Seeded by (seed, epoch): the data order is a pure function of
    them, which is what lets a resumed job continue exactly where its checkpoint left off."""
    rng = np.random.default_rng([spec.seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    per_step = spec.per_device_batch * spec.grad_accum * world
    window = spec.per_device_batch * spec.group_window if spec.group_window else per_step
    micro = []
    for w in range(0, len(order) // per_step * per_step, window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        micro += [chunk[i:i + spec.per_device_batch] for i in range(0, len(chunk), spec.per_device_batch)]
    if spec.group_window:
        micro = [micro[i] for i in rng.permutation(len(micro))]
    return [micro[s * per_step // spec.per_device_batch:(s + 1) * per_step // spec.per_device_batch]
            for s in range(len(order) // per_step)]


# ----------------------------------------------------------------------------------------------- compute
class ResponseLoss(torch.nn.Module):
    """Sum of response-token cross-entropies and their count; the LM head sees response positions only.

    A module (not a function) so that DistributedDataParallel can wrap it: DDP syncs gradients only for
    forward passes that go through the wrapper."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model

    def forward(self, input_ids, labels):
        inner = self.peft_model.get_base_model()
        # No attention mask (right padding is invisible under causal attention) and no KV cache. The decoder and
        # the head by transformers' accessors: `model`/`lm_head` on Llama-like models, `gpt_neox`/`embed_out`...
        hidden = inner.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != D.IGNORE
        logits = inner.get_output_embeddings()(hidden[:, :-1][keep]).float()
        cap = getattr(inner.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3 cap their logits in the causal-LM forward that this loss bypasses
            logits = torch.tanh(logits / cap) * cap
        return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum"), keep.sum()


def on_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(model: ResponseLoss, examples, spec: FinetuneSpec, device, rank: int, world: int, autocast,
                    pad_id: int = 0) -> float:
    """The validation loss, averaged as spec.val_loss_average says.

    "token" (default): the mean cross-entropy over every response token of the split, whatever the batching.
    "batch": the HF Trainer's evaluate() that the paper reports - batches of eval_batch (default
    per_device_batch) consecutive examples in the split's order, dealt to the ranks in turn, each batch's
    token mean weighted by its number of examples. It moves with the batch size and the order (a batch of short
    answers weighs as much as one of long answers), which is why "token" is the default; "batch" is there to
    compare with the paper's figures (the authors' NOMAD run: eval_batch 20; their TPE run: 4)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    if spec.val_loss_average == "batch":
        size = spec.eval_batch or spec.per_device_batch
        chunks = [list(range(i, min(i + size, len(examples)))) for i in range(0, len(examples), size)]
    else:
        order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # similar lengths together
        size = spec.eval_batch or 2 * spec.per_device_batch  # no gradients to keep: twice the micro-batch fits
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
    mine = chunks[rank::world]
    if world > 1 and any(hasattr(p, "to_local") for p in model.parameters()):
        # sharded (fsdp): every forward gathers weights from all ranks, so every rank runs as many; the extra
        # ones (ranks with a chunk fewer) count nothing
        mine += [[]] * (math.ceil(len(chunks) / world) - len(mine))
    for chunk in mine:
        with autocast:
            loss, count = model(**on_device(collate([examples[i] for i in chunk or chunks[0]], pad_id), device))
        if not chunk:
            continue
        if spec.val_loss_average == "batch":  # (batch mean x examples, examples)
            total += torch.stack([loss.double() / count.double() * len(chunk), total.new_tensor(len(chunk))])
        else:  # (summed loss, tokens)
            total += torch.stack([loss.double(), count.double()])
    if world > 1:
        torch.distributed.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def partial_steps(spec: FinetuneSpec, total_steps: int) -> dict[int, float]:
    """{optimizer step: fraction} of the intermediate validation passes: the first step at or past each."""
    steps = {}
    for f in spec.eval_fractions:
        step = min(total_steps - 1, max(1, math.ceil(f * total_steps)))
        steps.setdefault(step, f)
    return steps


def validation_subset(val_set: list, spec: FinetuneSpec) -> list:
    """The first eval_subset examples of a shuffle seeded by the data seed: the same for every trial."""
    if spec.eval_subset is None or spec.eval_subset >= len(val_set):
        return val_set
    order = np.random.default_rng(spec.data.seed).permutation(len(val_set))
    return [val_set[i] for i in sorted(order[:spec.eval_subset])]


