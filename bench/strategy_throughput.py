"""Tokens/s and peak GPU memory of each strategy (bf16 ddp, QLoRA nf4, FSDP over every visible GPU) on one model,
against the bf16 run in the same invocation, with jobs/memory.py's estimate beside each measured peak.

    .venv/bin/python bench/strategy_throughput.py --model-dir DIR              # a GPU machine (bench/gpu_smoke.sh)
    .venv/bin/python bench/strategy_throughput.py --model-dir DIR --max-steps 20 --per-device-batch 8

Each strategy is one real fine-tune through the recipe (jobs.finetune.run; FSDP under torchrun with one rank
per GPU, skipped with fewer than 2 GPUs), same data, batch, sequence length and steps. Tokens/s counts real
(non-padding) tokens of all ranks. Peak memory is rank 0's torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_one(spec, gpus: int) -> dict:
    """One fine-tune: in this process, or under torchrun with `gpus` ranks."""
    if gpus <= 1:
        from jobs import finetune
        result = finetune.run(spec)
    else:
        path = Path(spec.out).with_suffix(".json")
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        spec.to_json(path)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "-m",
                        "jobs.finetune", "--spec", str(path)], cwd=REPO, check=False)
        result = json.loads((Path(spec.out) / "result.json").read_text())
    if result["status"] != "ok":
        raise SystemExit(f"{spec.strategy}/{spec.quantization}: {result['reason']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="a HF-layout model folder (tests/test_gpu.py llama_1b)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from jobs.memory import estimate_spec
    from jobs.spec import preset

    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("needs a CUDA GPU (this bench measures GPU memory and throughput)")
    out = Path(tempfile.mkdtemp(prefix="strategies-"))
    common = dict(base_model=args.model_dir, max_steps=args.max_steps, per_device_batch=args.per_device_batch,
                  grad_accum=args.grad_accum, max_seq_len=args.max_seq_len, precision="bf16", log_every=1,
                  gradient_checkpointing=args.gradient_checkpointing, data={"total_rows": 2000})
    runs = [("bf16 ddp, 1 GPU", dict(), 1), ("nf4 (QLoRA), 1 GPU", dict(quantization="nf4"), 1)]
    if gpus >= 2:
        runs.append((f"bf16 fsdp, {gpus} GPUs", dict(strategy="fsdp", grad_accum=max(1, args.grad_accum // gpus)),
                     gpus))
    else:
        print("fsdp: skipped (needs 2 GPUs or more; this machine has 1)")
    rows = []
    for name, extra, ranks in runs:
        spec = preset("tiny", out=str(out / name.split(",")[0].replace(" ", "-")), **{**common, **extra})
        result = run_one(spec, ranks)
        estimate = estimate_spec(spec.to_dict(), ranks)
        rows.append((name, result["tokens_per_s"], result["peak_memory_bytes"] / 2 ** 30, estimate["peak_gb"]))
    base = rows[0][1]
    print(f"\n{'strategy':<22} {'tokens/s':>10} {'vs bf16':>8} {'peak GiB':>9} {'estimate':>9} {'error':>7}")
    for name, tps, peak, est in rows:
        print(f"{name:<22} {tps:>10.0f} {tps / base:>8.2f} {peak:>9.2f} {est:>9.2f} {(est - peak) / peak:>+7.1%}")
    print(f"\ncard: {torch.cuda.get_device_name()} x {gpus}; tokens/s of fsdp counts all ranks")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
