"""Slot utilization of real studies at K slots: nomad (its default profile at K > 1: async), tpe and random.

    .venv/bin/python bench/parallel_real.py                          # local executor, K=4, 24 trials of 4 s
    .venv/bin/python bench/parallel_real.py --executor slurm         # on the dev cluster (eval "$(slurm/dev-cluster.sh env)")
    .venv/bin/python bench/parallel_real.py --algos nomad random --sleep 2 --budget 16

Each study runs `python -m orchestrator --objective orchestrator.search.landscapes:sleeper` (a blackbox that sleeps
--sleep seconds and reports when it ran); utilization = the busy slot-seconds (sum of the objectives' own run
times) over K x the wall time from the first evaluation's start to the last one's end. What a slot loses is
the orchestrator's and the scheduler's (SLURM) latency between a result and the next start. Target (issue 9):
each algorithm within 0.05 of random search's utilization, measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def utilization(root: Path, study: str, k: int) -> tuple[float, float]:
    spans = []
    for result in (root / "runs" / study / "trials").glob("*/result.json"):
        data = json.loads(result.read_text())
        if data.get("status") == "ok":
            spans.append((data["busy_start"], data["busy_end"]))
    busy = sum(end - start for start, end in spans)
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return busy / (k * wall), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algos", nargs="+", default=["random", "nomad", "tpe"])
    p.add_argument("--executor", default="local", choices=["local", "slurm"])
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--budget", type=int, default=24)
    p.add_argument("--sleep", type=float, default=4.0)
    p.add_argument("--poll", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2,
                   help="studies per algorithm, interleaved (the first study on a fresh cluster pays its warm-up)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-parallel-real-"))
    rows = {}
    try:
        for round_, algo in [(r, a) for r in range(args.rounds) for a in args.algos]:
            study = f"{algo}-k{args.k}-{round_}"
            done = subprocess.run([sys.executable, "-m", "orchestrator", "--study", study, "--algo", algo,
                                   "--budget", str(args.budget), "--parallel", str(args.k), "--executor",
                                   args.executor, "--objective", "orchestrator.search.landscapes:sleeper", "--poll",
                                   str(args.poll), "--workdir", str(root / "runs"), "--tracking-uri",
                                   f"sqlite:///{root}/mlruns/mlflow.db"], cwd=REPO, capture_output=True, text=True,
                                  env={**os.environ, "LORA_HPO_SLEEP_S": str(args.sleep)})
            if done.returncode != 0:
                print(f"{algo}: the study failed: {done.stderr[-400:]}", flush=True)
                continue
            u, wall = utilization(root, study, args.k)
            rows.setdefault(algo, []).append(u)
            print(f"{algo:7s} K={args.k} {args.executor} round {round_}: utilization {u:.3f} "
                  f"({args.budget} x {args.sleep:g} s in {wall:.1f} s)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if "random" in rows:
        base = statistics.mean(rows["random"])
        for algo, us in rows.items():
            if algo != "random":
                u = statistics.mean(us)
                verdict = "MET" if u >= base - 0.05 else "NOT MET"
                print(f"{algo}: mean utilization {u:.3f} vs random's {base:.3f} ({u - base:+.3f}; target: no more "
                      f"than 0.05 below random: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
