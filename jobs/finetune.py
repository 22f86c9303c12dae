"""The blackbox: one LoRA instruction-tuning run that returns the validation loss.

    python -m jobs.finetune --preset tiny --r 8 --alpha 16 --dropout 0.05 --lr 1e-3 --out runs/demo
    python -m jobs.finetune --spec runs/demo/spec.json                 # rerun a trial from its spec
    torchrun --nproc_per_node 4 -m jobs.finetune --preset paper --out /scratch/trial-7   # 4 GPUs, one node
    torchrun --nproc_per_node 8 -m jobs.finetune --preset paper --strategy fsdp --base-model meta-llama/Llama-2-70b-hf
    python -m jobs.finetune --preset paper --quantization nf4 --base-model meta-llama/Llama-2-70b-hf  # QLoRA, 1 GPU

Python: `run(spec) -> dict` (the result), which the orchestrator submits as a job. The output folder gets
spec.json, metrics.jsonl (per-step loss, lr, grad norm, tokens/s; flushed as it goes), checkpoints/ (adapter
weights, optimizer, scheduler, step and RNG states), and at the end adapter/ (PEFT format) and result.json.
How the base model is held across GPUs and nodes (ddp, fsdp, a 4-bit nf4 base) is jobs/strategies.py's.
A job restarted on the same folder continues from its last checkpoint and ends with the same result.
Failures are data: a NaN loss, out-of-memory, bad data or bad hyperparameters give result.json with status
"failed" and a one-line reason (and a non-zero exit on the command line), never a complete-looking adapter.

Speed: each optimizer step's examples (a uniformly random sample) are split into micro-batches by length,
so padding is small; rows are right-padded and run with *no* attention mask: under a causal mask a real
token never sees the padding after it, so SDPA takes its plain causal path and no mask is built. The LM
head runs on response positions only (the prompt and the padding carry no loss), and losses stay on the
device between log flushes (no per-step host sync).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs import checkpoint, strategies
from jobs import contract as C
from jobs import data as D
from jobs.chat import use_chat_template
from jobs.batches import (ResponseLoss, collate, epoch_plan, loss_tokens, on_device, partial_steps,  # noqa: F401
                          validation_loss, validation_subset)
from jobs.model import TrainingFailure, add_lora, distributed_env, load_base, pick_precision  # noqa: F401
from jobs.model import add_pad_token, autocast_for
from jobs.spec import FinetuneSpec, SpecError, preset

METRICS, ADAPTER = C.METRICS_FILE, C.ADAPTER_DIR
checkpoint_now = checkpoint.now  # for jobs/entry.py's signal handler: the step saved, or None


# ----------------------------------------------------------------------------------------------- the recipe
@dataclass
class Setup:
    """Everything the loop needs, built once per attempt (the model, the data, the optimizer...)."""
    device: torch.device
    dtype: torch.dtype
    autocast: object
    splits: Path
    train_set: list
    val_set: list
    dropped: int
    pad_id: int
    lengths: list
    targets: list
    steps_per_epoch: int
    total_steps: int
    model: object
    loss_fn: ResponseLoss
    held: strategies.Held  # how the strategy holds the model (ddp, fsdp, nf4)
    trainable: list
    optimizer: object
    scheduler: object
    as_run: dict  # what the authors'-run options did (result.json): tokenizer, attention, autocast, embeddings


def set_up(spec: FinetuneSpec, rank: int, world: int, local_rank: int) -> Setup:
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    dtype = pick_precision(spec, device)
    autocast = autocast_for(spec, device, dtype)
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)

    splits = D.prepare_splits(spec.data)
    tokenizer, model = strategies.load(spec, device, dtype, rank, world)
    if spec.trainable_embeddings == "as_run":
        add_pad_token(tokenizer)  # before tokenizing, as the authors' script: [PAD] is then a special token
    use_chat_template(tokenizer, spec.chat_template)  # prompt_template "chat" with the spec's own template
    train_set, dropped_train = D.tokenize(D.read_split(splits, "train"), tokenizer, spec.max_seq_len,
                                          spec.prompt_template)
    val_set, dropped_val = D.tokenize(D.read_split(splits, "val"), tokenizer, spec.max_seq_len, spec.prompt_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if not train_set or not val_set:
        raise TrainingFailure(f"no trainable examples at max_seq_len={spec.max_seq_len}: raise max_seq_len")
    lengths = [len(ids) for ids, _ in train_set]
    steps_per_epoch = len(epoch_plan(lengths, spec, world, 0))
    if steps_per_epoch == 0:
        raise TrainingFailure(f"{len(train_set)} training examples are fewer than one optimizer step "
                              f"({spec.per_device_batch} x {spec.grad_accum} x {world}): lower the batch")
    total_steps = spec.max_steps or math.ceil(spec.epochs * steps_per_epoch)

    held = strategies.hold(model, spec, device, dtype, rank, world, local_rank, tokenizer)  # LoRA on it, wrapped
    model = held.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    from transformers import get_cosine_schedule_with_warmup
    optimizer = strategies.make_optimizer(spec, trainable, device, held.sharded)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(spec.warmup_ratio * total_steps), total_steps)
    return Setup(device, dtype, autocast, splits, train_set, val_set, dropped_train + dropped_val, pad_id, lengths,
                 [loss_tokens(e) for e in train_set],  # counted once, not in every step of every epoch
                 steps_per_epoch, total_steps, model, held.loss_fn, held, trainable, optimizer, scheduler,
                 as_run_facts(model, tokenizer, autocast, held.embedding_params))


def as_run_facts(model, tokenizer, autocast, embedding_params: int) -> dict:
    """What the options that reproduce the authors' run really gave (recorded in result.json)."""
    inner = model.get_base_model()
    return {"tokenizer_class": type(tokenizer).__name__, "attn_implementation": inner.config._attn_implementation,
            "autocast": str(autocast.fast_dtype).replace("torch.", "") if isinstance(autocast, torch.autocast)
            else None, "embedding_params_trained": embedding_params,
            "vocab_rows": inner.get_input_embeddings().weight.shape[0]}


def train(spec: FinetuneSpec, out: Path, rank: int, world: int, local_rank: int) -> dict:
    t0 = time.time()
    s = set_up(spec, rank, world, local_rank)
    model, optimizer, scheduler = s.model, s.optimizer, s.scheduler
    start = checkpoint.load(out, model, optimizer, scheduler)
    if rank == 0:
        checkpoint.trim_metrics(out / METRICS, start)

    def val_loss() -> float:
        return validation_loss(s.loss_fn, s.val_set, spec, s.device, rank, world, s.autocast, s.pad_id)

    val_before = val_loss() if spec.eval_before and start == 0 else None
    partial_at = partial_steps(spec, s.total_steps)  # {step: fraction} of the intermediate validation passes
    subset = validation_subset(s.val_set, spec) if partial_at else None
    log = open(out / METRICS, "a") if rank == 0 else None
    pending, train_losses, t_train, tokens_seen = [], [], time.time(), 0
    t_window, tokens_window, plan, plan_epoch, saved_at = time.time(), 0, [], -1, time.time()
    # Until an update starts, model, optimizer and scheduler hold the state that ended step boundary["step"];
    # its RNG state is kept aside (dropout draws from the generator during the next forward passes).
    boundary = {"step": start, "rng": checkpoint.rng_state(), "busy": False}

    def save_now() -> int | None:
        if boundary["busy"] or not checkpoint.writes(rank, model):  # fsdp: every rank saves its own slice
            return None
        boundary["busy"] = True  # a second signal during this save must not write the same file
        if pending and world == 1:  # a checkpoint implies its metrics on disk (_flush all-reduces over ranks)
            train_losses.extend(_flush(pending, log, world, tokens_window / max(time.time() - t_window, 1e-9)))
            pending.clear()
        checkpoint.save(out, boundary["step"], model, optimizer, scheduler, spec.keep_checkpoints, boundary["rng"])
        boundary["busy"] = False
        return boundary["step"]

    min_step_s = float(os.environ.get("LORA_HPO_MIN_STEP_S") or 0)  # tests and demos: slow the steps down
    with checkpoint.saving(save_now):
        for step in range(start, s.total_steps):
            t_step = time.time()
            epoch = step // s.steps_per_epoch
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(s.lengths, spec, world, epoch), epoch
            micro = plan[step % s.steps_per_epoch]
            step_tokens = sum(s.targets[i] for mb in micro for i in mb)  # global, known up front
            real_tokens = sum(s.lengths[i] for mb in micro for i in mb)  # all ranks, no padding
            tokens_seen, tokens_window = tokens_seen + real_tokens, tokens_window + real_tokens
            mine = micro[rank::world]
            step_loss = torch.zeros((), device=s.device)
            for k, mb in enumerate(mine):
                with s.held.micro(k == len(mine) - 1), s.autocast:  # gradients synced in the last one
                    batch = on_device(collate([s.train_set[i] for i in mb], s.pad_id), s.device)
                    loss, _ = s.held.forward(**batch)
                (loss * world / step_tokens).backward()  # DDP averages over ranks: scale so the sum is exact
                step_loss += loss.detach()
            boundary["busy"] = True  # until the end of this step, the state is between two steps
            grad_norm = strategies.clip(s.trainable, spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            pending.append((step + 1, epoch, step_loss, step_tokens, scheduler.get_last_lr()[0], grad_norm))
            last = step + 1 == s.total_steps
            due = not last and ((spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0)
                                or _time_due(spec, saved_at, pending, world, s.device))
            if len(pending) >= spec.log_every or last or due:  # a checkpoint implies its metrics are on disk
                train_losses += _flush(pending, log, world, tokens_window / max(time.time() - t_window, 1e-9))
                pending, t_window, tokens_window = [], time.time(), 0
            if spec.eval_every and (step + 1) % spec.eval_every == 0 and not last:
                _append(log, {"step": step + 1, "val_loss": val_loss()})
            if step + 1 in partial_at:  # at most one attempt writes it: a resumed one starts past its step
                v = validation_loss(s.loss_fn, subset, spec, s.device, rank, world, s.autocast, s.pad_id)
                _append(log, {"step": step + 1, "fraction": partial_at[step + 1], "val_loss": v,
                              "subset": len(subset), "time": time.time()})
            if due:
                if checkpoint.writes(rank, model):
                    checkpoint.save(out, step + 1, model, optimizer, scheduler, spec.keep_checkpoints, together=True)
                saved_at = time.time()
            boundary.update(step=step + 1, rng=checkpoint.rng_state(), busy=False)
            if min_step_s:
                time.sleep(max(0.0, min_step_s - (time.time() - t_step)))
        # a stop during the final pass saves the finished training: the next attempt only evaluates
        train_s, t_eval = time.time() - t_train, time.time()
        val = val_loss()
    if not math.isfinite(val):
        raise TrainingFailure(f"validation loss is {val}: the run diverged; lower the learning rate")
    _append(log, {"step": s.total_steps, "val_loss": val})
    if log:
        log.close()
    strategies.save_adapter(model, out / ADAPTER, rank)  # PEFT format, written by rank 0 (fsdp: gathered first)
    return {
        "val_loss": val, "val_loss_before": val_before, "val_loss_average": spec.val_loss_average,
        "train_loss": float(np.mean(train_losses[-max(1, s.steps_per_epoch):])) if train_losses else None,
        "steps": s.total_steps, "resumed_from_step": start, "steps_per_epoch": s.steps_per_epoch,
        "n_train": len(s.train_set), "n_val": len(s.val_set), "dropped_too_long": s.dropped,
        "train_tokens": tokens_seen, "tokens_per_s": tokens_seen / max(train_s, 1e-9),
        "train_s": train_s, "eval_s": time.time() - t_eval, "setup_s": t_train - t0,
        # the adapter's (LoRA) parameters; trainable_embeddings: as_run trains embedding_params_trained more
        "trainable_params": sum(p.numel() for p in s.trainable) - s.as_run["embedding_params_trained"],
        "epochs_run": s.total_steps / s.steps_per_epoch, **s.as_run,
        "total_params": strategies.count_params(model), "device": str(s.device), "world_size": world,
        "strategy": spec.strategy, "quantization": spec.quantization,
        "dtype": str(s.dtype).replace("torch.", ""), "peak_memory_bytes": _peak_memory(s.device),
        "data_folder": str(s.splits),
    }


def _time_due(spec: FinetuneSpec, saved_at: float, pending: list, world: int, device) -> bool:
    """A time-based checkpoint is due. Checked at flush points only (every rank is there at the same step), and
    any rank's clock decides for all (an all-reduce), so that every rank takes the same branch."""
    if not spec.checkpoint_every_s or len(pending) < spec.log_every:
        return False
    due = torch.tensor([float(time.time() - saved_at >= spec.checkpoint_every_s)], device=device)
    if world > 1:
        torch.distributed.all_reduce(due, op=torch.distributed.ReduceOp.MAX)
    return bool(due.item())


def _flush(pending, log, world, tokens_per_s) -> list[float]:
    """One host sync for several steps: write their metrics, fail fast on a non-finite loss."""
    values = torch.stack([torch.stack([p[2].float(), torch.as_tensor(p[5], device=p[2].device).float()])
                          for p in pending])
    if world > 1:  # the loss sums over ranks, on the device (NCCL has no CPU tensors); a column is not contiguous
        losses = values[:, 0].contiguous()
        torch.distributed.all_reduce(losses)
        values[:, 0] = losses
    values = values.cpu()
    losses = []
    for (step, epoch, _, n_tokens, lr, _), (loss_sum, grad_norm) in zip(pending, values.tolist()):
        loss = loss_sum / n_tokens
        if not math.isfinite(loss):
            raise TrainingFailure(f"training loss became {loss} at step {step}: diverged; lower the learning rate")
        losses.append(loss)
        _append(log, {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens_per_s, "time": time.time()})
    return losses


def _peer_lost(e: Exception) -> bool:
    """A collective failed because a peer rank went away (NCCL raises DistError; gloo a RuntimeError)."""
    return isinstance(e, torch.distributed.DistError) or any(
        mark in str(e) for mark in ("gloo/transport", "Connection closed by peer", "Connection reset by peer"))


def _append(log, record: dict) -> None:
    if log:
        log.write(json.dumps(record) + "\n")
        log.flush()  # another process (the orchestrator) follows this file live


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _versions() -> dict:
    import peft
    import transformers
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


# ----------------------------------------------------------------------------------------------- entry points
def run(spec: FinetuneSpec | dict) -> dict:
    """Fine-tune as the spec says and return the result (also written to OUT/result.json).

    A finished folder returns its result without training again (a requeued job that had completed)."""
    t0 = time.time()
    spec_dict = spec.to_dict() if isinstance(spec, FinetuneSpec) else dict(spec)
    out = Path(spec_dict.get("out") or "runs/finetune")
    result = {"status": "failed", "reason": None, "val_loss": None, "spec": spec_dict}
    rank = world = 0
    try:
        out.mkdir(parents=True, exist_ok=True)  # first: even an invalid spec leaves its failed result.json
        spec = spec if isinstance(spec, FinetuneSpec) else FinetuneSpec.from_dict(spec_dict)
        previous = C.finished_ok(out)
        if previous:
            return previous
        rank, world, local_rank = distributed_env()
        spec = spec.with_world(world)  # grad_accum from effective_batch, if set, now that the ranks are known
        if rank == 0:
            spec.to_json(out / C.SPEC_FILE)
            shutil.rmtree(out / ADAPTER, ignore_errors=True)  # a stale adapter must not look like this run's
            (out / C.RESULT_FILE).unlink(missing_ok=True)  # nor an earlier attempt's failure
        result.update(train(spec, out, rank, world, local_rank), status="ok")
    except (SpecError, D.DataError, TrainingFailure) as e:
        result["reason"] = str(e)
    except torch.OutOfMemoryError as e:
        result["reason"] = f"out of memory ({str(e).splitlines()[0][:120]}): lower per_device_batch or max_seq_len"
    except Exception as e:  # any other failure is still this evaluation's result, with its traceback kept
        if world > 1 and _peer_lost(e):  # another rank's process or node is gone: this attempt failed, not the
            raise                        # trial; the job's state (NODE_FAIL...) decides on a retry
        result["reason"] = C.failure_reason(e)
        result["traceback"] = traceback.format_exc()
    result["total_s"] = time.time() - t0
    result["versions"] = _versions()
    typed = C.TrialResult.from_dict(result)  # the contract's one vocabulary (jobs/contract.py)
    if rank == 0 and out.is_dir():
        if not typed.ok:
            shutil.rmtree(out / ADAPTER, ignore_errors=True)
        C.write_result(out, typed)
    return typed.to_dict()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="LoRA instruction-tuning of one configuration; prints val_loss.")
    parser.add_argument("--spec", help="spec.json to run (other flags override its fields)")
    parser.add_argument("--preset", default="tiny", help="tiny (embedded default) or paper")
    parser.add_argument("--out", help="output folder")
    for name, kind in (("r", int), ("alpha", float), ("dropout", float), ("lr", float), ("epochs", float),
                       ("max_steps", int), ("per_device_batch", int), ("grad_accum", int),
                       ("max_seq_len", int), ("seed", int), ("eval_every", int), ("checkpoint_every", int),
                       ("base_model", str), ("precision", str), ("strategy", str), ("quantization", str),
                       ("trainable_embeddings", str), ("attn_implementation", str), ("tokenizer", str),
                       ("eval_batch", int)):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("spec", "preset") and v is not None}
    try:
        spec = FinetuneSpec.from_json(args.spec).replace(**overrides) if args.spec \
            else preset(args.preset, **overrides)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(spec)
    if result["status"] != "ok":
        print(f"failed: {result['reason']}", file=sys.stderr)
        return 1
    print(json.dumps({k: result[k] for k in ("val_loss", "train_loss", "tokens_per_s", "train_s", "steps")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
