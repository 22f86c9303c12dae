"""Throughput of the recipe against a plain HF Trainer + PEFT baseline on the same model, data and settings.

    .venv/bin/python bench/finetune_throughput.py                 # tiny preset, CPU
    .venv/bin/python bench/finetune_throughput.py --repeats 3     # alternate runs, report medians
    .venv/bin/python bench/finetune_throughput.py --model-dir DIR --max-seq-len 512 --precision bf16  # a GPU

Both train the same LoRA (same r, alpha, dropout, lr, cosine schedule with warmup, batch, accumulation,
steps) on the same prepared split. The baseline is what most scripts do: `Trainer` with
`DataCollatorForSeq2Seq` padding each batch to its longest row, the LM head over every position. Tokens/s
counts real (non-padding) tokens only. Both validation losses are measured by the same token-weighted
function, so their gap shows that the speed-up does not change what is learned.
Repeat i uses seed i for both; the summary gives median tokens/s and the mean validation loss over seeds
(one seed's loss moves by a few percent with the data order alone). Target: ratio >= 1.5, losses within 2%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jobs import data as D  # noqa: E402
from jobs import finetune as F  # noqa: E402
from jobs.spec import preset  # noqa: E402


def ours(spec) -> dict:
    result = F.run(spec)
    assert result["status"] == "ok", result["reason"]
    return {"tokens_per_s": result["tokens_per_s"], "val_loss": result["val_loss"], "train_s": result["train_s"],
            "base_params": result["total_params"] - result["trainable_params"]}


def baseline(spec) -> dict:
    """Plain HF Trainer + PEFT: padded batches, full-sequence LM head, Trainer's own loop."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from transformers import set_seed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = F.pick_precision(spec, device)
    set_seed(spec.seed)  # the LoRA initialization draws from the RNG, as in the recipe
    tokenizer, model = F.load_base(spec.base_model, device, dtype)
    model = F.add_lora(model, spec)
    folder = D.prepare_splits(spec.data)
    train, _ = D.tokenize(D.read_split(folder, "train"), tokenizer, spec.max_seq_len)
    val, _ = D.tokenize(D.read_split(folder, "val"), tokenizer, spec.max_seq_len)
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels} for ids, labels in train]
    steps = spec.max_steps or len(F.epoch_plan([len(i) for i, _ in train], spec, 1, 0)) * int(spec.epochs)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="baseline-"), per_device_train_batch_size=spec.per_device_batch,
        gradient_accumulation_steps=spec.grad_accum, learning_rate=spec.lr, lr_scheduler_type="cosine",
        warmup_steps=int(spec.warmup_ratio * steps + 0.999), weight_decay=spec.weight_decay, max_steps=steps,
        max_grad_norm=spec.max_grad_norm, logging_steps=10, save_strategy="no", report_to=[],
        bf16=dtype == torch.bfloat16, seed=spec.seed, dataloader_drop_last=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=D.IGNORE))
    t0 = time.time()
    trainer.train()
    train_s = time.time() - t0
    real_tokens = steps * spec.grad_accum * spec.per_device_batch * statistics.mean(len(i) for i, _ in train)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    val_loss = F.validation_loss(F.ResponseLoss(model), val, spec, device, 0, 1, autocast)
    return {"tokens_per_s": real_tokens / train_s, "val_loss": val_loss, "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model-dir", default="tiny", help="base model (default: the embedded tiny one)")
    parser.add_argument("--max-seq-len", type=int, default=None)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--per-device-batch", type=int, default=None)
    parser.add_argument("--grad-accum", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, to print MFU (H100/H200 SXM: 989)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    overrides = dict(base_model=args.model_dir, precision=args.precision, r=8, alpha=16, dropout=0.05, lr=1e-3)
    if args.max_seq_len:
        overrides["max_seq_len"] = args.max_seq_len
    for key in ("max_steps", "per_device_batch", "grad_accum"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    runs = {"recipe": [], "baseline": []}
    for i in range(args.repeats):  # alternate, so that machine noise hits both alike; a seed per repeat
        spec = preset("tiny", out=str(work / f"ours-{i}"), seed=i, **overrides)
        spec.data.cache_dir = str(work / "data")
        for name, fn in (("recipe", ours), ("baseline", baseline)):
            runs[name].append(fn(spec))
            print(f"{name:9s} run {i}: {json.dumps(runs[name][-1])}", flush=True)
    # speed: the median over repeats; loss: the mean over seeds (a single seed's loss is noise-sized)
    med = {name: {k: (statistics.mean if k == "val_loss" else statistics.median)(r[k] for r in rs)
                  for k in ("tokens_per_s", "val_loss", "train_s")} for name, rs in runs.items()}
    ratio = med["recipe"]["tokens_per_s"] / med["baseline"]["tokens_per_s"]
    gap = abs(med["recipe"]["val_loss"] - med["baseline"]["val_loss"]) / med["baseline"]["val_loss"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU x{torch.get_num_threads()}"
    print(f"\ndevice: {device}   model: {args.model_dir}   repeats (seeds): {args.repeats}   "
          f"batch {spec.per_device_batch} x accumulation {spec.grad_accum}, {spec.max_steps or 'all'} steps")
    print(f"{'':10s}{'tokens/s':>12s}{'val_loss':>10s}{'train_s':>9s}")
    for name, m in med.items():
        print(f"{name:10s}{m['tokens_per_s']:12.0f}{m['val_loss']:10.4f}{m['train_s']:9.1f}")
    print(f"ratio (recipe / baseline tokens/s): {ratio:.2f}   val_loss gap: {100 * gap:.2f}%")
    if args.peak_tflops:  # model FLOPs utilization: ~6 N FLOPs per token (forward, backward, weight grads)
        n = runs["recipe"][0]["base_params"]
        for name, m in med.items():
            mfu = 6 * n * m["tokens_per_s"] / (args.peak_tflops * 1e12)
            print(f"MFU {name}: {100 * mfu:.1f}% (6 x {n / 1e9:.2f}B params x tokens/s over {args.peak_tflops:g} "
                  "TFLOPS; a frozen base skips its weight gradients, so this overstates the FLOPs needed)")


if __name__ == "__main__":
    main()
