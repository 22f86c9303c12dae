"""GPU-hours saved by pruning on real training curves: tiny-preset studies with and without a pruner.

    .venv/bin/python bench/gpu_hours_real.py                      # nomad and tpe, 2 seeds, 12 trials, 2 slots
    .venv/bin/python bench/gpu_hours_real.py --algos tpe --seeds 1 --budget 8

The companion of bench/gpu_hours.py (a simulation with a learning-curve model, many seeds): here every trial
is a real fine-tune of the tiny model on this machine (local executor, CPU), reporting its intermediate
validation loss at fractions of training, and the pruned study runs the real study loop (orchestrator/
pruning.py). Job time stands for GPU time (the trials' own total_s, pruned ones up to their cancellation).
Per (algo, seed): the unpruned study's final best and the job-hours it had spent when it first held it; the
pruned study's final best and the job-hours it needed to be as good (or "never"), and its total. Small budgets
on a CPU: the figures are indicative, the simulation's are the statistics.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.study.journal import load_study  # noqa: E402

PRUNER = {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3, "margin": 0.05}


def run(root: Path, name: str, algo: str, seed: int, budget: int, parallel: int, pruner: dict | None) -> list:
    config = {"study": name, "algo": algo, "seed": seed, "budget": budget, "parallel": parallel,
              "executor": "local", "poll_s": 0.3, "register_as": "",
              "trial": {"max_steps": 40, "log_every": 5, "eval_subset": 60, "data": {"total_rows": 400}}}
    if pruner:
        config["pruner"] = pruner
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--config", str(path), "--workdir",
                           str(root / "runs"), "--tracking-uri", f"sqlite:///{root}/mlruns/mlflow.db"], cwd=REPO,
                          capture_output=True, text=True, env=os.environ)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"study {name} failed: {done.stderr[-400:]}")
    state = load_study(root / "runs" / name)
    return sorted(state.finished, key=lambda t: t.finished_at)


def account(trials: list, target: float | None = None) -> dict:
    """Final best; job-hours to first reach `target` (default: the final best); total job-hours."""
    spent, best, reached = 0.0, float("inf"), None
    final = min((t.value for t in trials if t.status == "ok"), default=float("inf"))
    goal = final if target is None else target
    for t in trials:
        spent += (t.summary.get("total_s") or 0.0) / 3600
        if t.status == "ok":
            best = min(best, t.value)
        if reached is None and best <= goal + 1e-12:
            reached = spent
    return {"best": final, "to_target_h": reached, "total_h": spent,
            "pruned": sum(t.status == "pruned" for t in trials)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["nomad", "tpe"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--parallel", type=int, default=2)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-gpu-hours-real-"))
    try:
        for algo in args.algos:
            savings = []
            for seed in range(args.seeds):
                plain = account(run(root, f"{algo}-{seed}-none", algo, seed, args.budget, args.parallel, None))
                pruned_trials = run(root, f"{algo}-{seed}-asha", algo, seed, args.budget, args.parallel, PRUNER)
                pruned = account(pruned_trials, target=plain["best"])
                saving = (1 - pruned["to_target_h"] / plain["to_target_h"]) if pruned["to_target_h"] else None
                savings.append(saving)
                print(f"{algo} seed {seed}: unpruned best {plain['best']:.4f} after {plain['to_target_h'] * 60:.1f} "
                      f"job-min ({plain['total_h'] * 60:.1f} in all) | asha best {pruned['best']:.4f}, "
                      f"{pruned['pruned']} pruned, reached the unpruned best "
                      + (f"after {pruned['to_target_h'] * 60:.1f} job-min: saving {100 * saving:.0f}%"
                         if saving is not None else "never")
                      + f" ({pruned['total_h'] * 60:.1f} job-min in all)", flush=True)
            valid = [s for s in savings if s is not None]
            print(f"{algo}: median saving to the unpruned best {100 * statistics.median(valid):.0f}% "
                  f"({len(valid)}/{len(savings)} seeds reached it)" if valid else f"{algo}: never reached", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
