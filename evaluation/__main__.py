"""Command line: InstructEval-protocol scores of a (base model, adapter) pair, or HumanEval scoring alone.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh,drop,humaneval \\
        --data-dir DIR --limit 20 --out runs/eval/demo
    python -m evaluation --adapter models:/tiny-nomad-adapter@champion --tasks humaneval --greedy
    python -m evaluation --tasks humaneval --canonical                  # the sandbox on the real solutions
    python -m evaluation --tasks humaneval --completions samples.jsonl  # completions made elsewhere
    python -m evaluation --harness lm-eval --tasks hellaswag,arc_easy --base BASE --adapter ADAPTER --limit 50

Prints a table and writes OUT/scores.json and OUT/records/TASK.jsonl. Exit status: 0 done, 2 bad input
(wrong adapter path, missing data, unknown task), with a one-line message.
"""
from __future__ import annotations

import argparse
import sys
import time

from evaluation.tasks import NAMES
from evaluation.tasks.common import EvalError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    p.add_argument("--base", help="base model: hub id, local HF folder or tiny (default: the adapter's base)")
    p.add_argument("--adapter", help="PEFT folder, runs:/RUN_ID/PATH or models:/NAME@ALIAS (default: none)")
    p.add_argument("--harness", default="instructeval", choices=("instructeval", "lm-eval"),
                   help="instructeval: the paper's protocol (default); lm-eval: any lm-evaluation-harness task "
                        "(pip install lm-eval), with its own protocol")
    p.add_argument("--tasks", help=f"comma-separated: from {','.join(NAMES)} (default: all), or lm-eval task names")
    p.add_argument("--include-path", help="lm-eval only: a folder of task YAML files (your own tasks)")
    p.add_argument("--limit", type=int, help="first N test examples per MMLU subject / BBH subset, N for DROP "
                                             "and HumanEval")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--out", help="output folder (default runs/eval/TIMESTAMP)")
    p.add_argument("--data-dir", help="local benchmark folders (layout: evaluation/data.py); default: the hub")
    p.add_argument("--greedy", action="store_true", help="greedy HumanEval instead of one sample at T=0.1")
    p.add_argument("--seed", type=int, default=0, help="DROP demonstrations draw and HumanEval sampling (0)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--humaneval-cut", default="top-level", choices=("top-level", "blank-line"),
                   help="cut completions at the first blank line and top-level def/class/if/print "
                        "(default) or at the first blank line only (the reference)")
    p.add_argument("--workers", type=int, help="parallel HumanEval programs (default: CPUs, at most 8)")
    p.add_argument("--canonical", action="store_true", help="score HumanEval's canonical solutions (no model)")
    p.add_argument("--completions", help="score HumanEval completions from a JSONL file (task_id, completion)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from evaluation import runner

    out = args.out or time.strftime("runs/eval/%Y%m%d-%H%M%S")
    if args.harness == "lm-eval":
        return _lm_eval(args, out)
    args.tasks = args.tasks or ",".join(NAMES)
    try:
        if args.canonical or args.completions:
            if args.tasks != "humaneval" or (args.canonical and args.completions):
                raise EvalError("--canonical and --completions score HumanEval alone: pass --tasks humaneval "
                                "and one of them")
            result = runner.score_completions(
                None if args.canonical else runner.read_completions(args.completions), canonical=args.canonical,
                data_dir=args.data_dir, limit=args.limit, workers=args.workers, out=out)
        else:
            result = runner.evaluate(
                args.base, args.adapter, args.tasks, limit=args.limit, batch_size=args.batch_size,
                data_dir=args.data_dir, greedy=args.greedy, seed=args.seed, device=args.device, dtype=args.dtype,
                out=out, humaneval_cut=args.humaneval_cut, workers=args.workers)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(runner.table(result))
    missing = result["tasks"].get("humaneval", {}).get("missing")
    if missing:
        print(f"warning: {missing} HumanEval problems had no completion and were not scored", file=sys.stderr)
    print(f"written: {out}/scores.json")
    return 0


def _lm_eval(args, out: str) -> int:
    from evaluation import harness

    if args.canonical or args.completions or args.data_dir:
        print("error: --canonical, --completions and --data-dir belong to the InstructEval tasks, not --harness "
              "lm-eval", file=sys.stderr)
        return 2
    try:
        result = harness.evaluate(args.base, args.adapter, args.tasks or "", limit=args.limit,
                                  batch_size=args.batch_size, device=args.device, dtype=args.dtype, out=out,
                                  include_path=args.include_path)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(harness.table(result))
    print(f"written: {out}/scores.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
