"""What each option that reproduces the authors' run does to the objective, on the tiny model: the figures in
evaluation/PROTOCOL.md ("Training recipe").

    .venv/bin/python bench/as_run_options.py                     # tiny model, CPU, 30 steps, about 5 minutes
    .venv/bin/python bench/as_run_options.py --lr 1e-4 --only embeddings      # the baseline and one setting

One fine-tune per setting, same seed, same data (600-row bundled mix), the project's defaults otherwise; each
line changes one option from the baseline (fp32 on a CPU) to the authors' value; the last one sets them all.
Printed: the validation loss (token average) and its change against the baseline; the same for the model
that is saved and scored (the LoRA adapter alone on the base model: it differs where embeddings were trained);
the optimizer steps, the trainable parameters (LoRA + embeddings) and the training time (a ratio against the baseline of the same run: CPU bf16 autocast is emulated and slow on most
CPUs, so a CPU time says nothing of a GPU's, and on a shared machine the ratio is mostly noise). The tiny model is not Llama-2: the signs and orders of magnitude
are the point, not the values.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {
    "baseline (fp32, sdpa, fast, LoRA only)": {},
    "precision: fp32_autocast_bf16": {"precision": "fp32_autocast_bf16"},
    "precision: bf16 (CPU: bf16 weights)": {"precision": "bf16"},
    "trainable_embeddings: as_run": {"trainable_embeddings": "as_run"},
    "attn_implementation: eager": {"attn_implementation": "eager"},
    "max_steps: x1.35 (836 / 620)": {"max_steps": "x1.35"},
    "all of the above but bf16": {"precision": "fp32_autocast_bf16", "trainable_embeddings": "as_run",
                                  "attn_implementation": "eager", "max_steps": "x1.35"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--only", help="run the settings whose name holds this text (and the baseline)")
    args = parser.parse_args(argv)

    from jobs.finetune import run
    from jobs.spec import DataSpec, preset

    tmp = Path(tempfile.mkdtemp(prefix="as-run-"))
    data = DataSpec(total_rows=args.rows, cache_dir=str(tmp / "data"))
    rows, base = [], None
    for name, changes in SETTINGS.items():
        if args.only and changes and args.only not in name:
            continue
        steps = round(args.steps * 1.35) if changes.get("max_steps") == "x1.35" else args.steps
        spec = preset("tiny", out=str(tmp / f"run{len(rows)}"), data=data, lr=args.lr, seed=0,
                      **{"precision": "fp32", **changes, "max_steps": steps})
        result = run(spec)
        if result["status"] != "ok":
            print(f"{name}: failed: {result['reason']}")
            return 1
        base = base or (result["val_loss"], result["train_s"])
        scored = scored_loss(spec) if result["embedding_params_trained"] else result["val_loss"]
        rows.append((name, result["val_loss"], scored, result["steps"],
                     result["trainable_params"] + result["embedding_params_trained"], result["train_s"]))
    print(f"tiny model, CPU, {args.steps} steps at lr {args.lr}, {args.rows} rows; val loss: token average; "
          "scored: the saved (LoRA) adapter alone on the base model")
    print(f"{'setting':42s} {'val_loss':>9s} {'change':>8s} {'scored':>9s} {'change':>8s} {'steps':>6s} "
          f"{'trainable':>10s} {'time':>6s}")
    for name, loss, scored, steps, trainable, train_s in rows:
        print(f"{name:42s} {loss:9.4f} {100 * (loss / base[0] - 1):+7.2f}% {scored:9.4f} "
              f"{100 * (scored / base[0] - 1):+7.2f}% {steps:6d} {trainable:10d} {train_s / base[1]:5.2f}x")
    return 0


def scored_loss(spec) -> float:
    """The validation loss of what is saved and scored: the run's LoRA adapter on the plain base model (the
    embeddings it trained with are not in it), measured as the run measured its own (same options otherwise)."""
    import torch
    from safetensors.torch import load_file

    from jobs import finetune as F

    plain = spec.replace(trainable_embeddings="none", out=spec.out + "-scored")
    s = F.set_up(plain, 0, 1, 0)
    params = dict(s.model.named_parameters())
    with torch.no_grad():
        for key, value in load_file(str(Path(spec.out) / "adapter" / "adapter_model.safetensors")).items():
            params[key.replace(".weight", ".default.weight")].copy_(value)
    return F.validation_loss(s.loss_fn, s.val_set, plain, s.device, 0, 1, s.autocast, s.pad_id)


if __name__ == "__main__":
    sys.exit(main())
