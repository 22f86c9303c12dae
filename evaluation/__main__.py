"""Command line: InstructEval-protocol scores of a (base model, adapter) pair, or HumanEval scoring alone.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh,drop,humaneval \\
        --data-dir DIR --limit 20 --out runs/eval/demo
    python -m evaluation --config examples/paper/evaluation.yaml --adapter models:/llama2-nomad-adapter@champion
    python -m evaluation --adapter runs/demo/adapter --decoding sampling --temperature 0.6 --top-p 0.9 --seeds 0,1,2
    python -m evaluation --tasks humaneval --canonical                  # the sandbox on the real solutions
    python -m evaluation --tasks humaneval --completions samples.jsonl  # completions made elsewhere
    python -m evaluation --harness lm-eval --tasks hellaswag,arc_easy --base BASE --adapter ADAPTER --limit 50

The protocol defaults are InstructEval's (evaluation/spec.py, evaluation/PROTOCOL.md): --humaneval-cut
blank-line, --decoding reference, --dtype fp32, adapter unmerged. `--config FILE` reads spec fields from a YAML
or JSON file (a job's OUT/spec.json reruns it); flags given on the command line override it. Prints a table and
writes OUT/scores.json and OUT/records/TASK.jsonl. Exit status: 0 done, 2 bad input (an unknown protocol value,
sampling without seeds, a device or dtype this machine cannot run, a wrong adapter path, missing data), with a
one-line message and nothing written.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from evaluation.spec import (ATTN_IMPLEMENTATIONS, CUTS, DECODINGS, DTYPES, HARNESSES, MMLU_CELLS, TOKENIZERS,
                             EvaluationSpec, ProtocolError)
from evaluation.tasks import NAMES
from evaluation.tasks.common import EvalError

NOT_SPEC = ("config", "greedy", "canonical", "completions")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML or JSON file of spec fields (evaluation/spec.py); flags override it")
    p.add_argument("--base", help="base model: hub id, local HF folder or tiny (default: the adapter's base)")
    p.add_argument("--adapter", help="PEFT folder, runs:/RUN_ID/PATH or models:/NAME@ALIAS (default: none)")
    p.add_argument("--harness", help=f"{' or '.join(HARNESSES)} (default instructeval: the paper's protocol; "
                                     "lm-eval: any lm-evaluation-harness task, with its own protocol)")
    p.add_argument("--tasks", help=f"comma-separated: from {','.join(NAMES)} (default: all), or lm-eval task names")
    p.add_argument("--include-path", help="lm-eval only: a folder of task YAML files (your own tasks)")
    p.add_argument("--limit", type=int, help="first N test examples per MMLU subject / BBH subset, N for DROP "
                                             "and HumanEval")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 8)")
    p.add_argument("--out", help="output folder (default runs/eval/TIMESTAMP)")
    p.add_argument("--data-dir", help="local benchmark folders (layout: evaluation/data.py); default: the hub")
    p.add_argument("--seed", type=int, help="DROP demonstrations draw, and the sampling seed without --seeds (0)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--tracking-uri", help="MLflow store of runs:/ and models:/ adapters (default: "
                                          "$MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--workers", type=int, help="parallel HumanEval programs (default: CPUs, at most 8)")
    g = p.add_argument_group("protocol (defaults: InstructEval's)")
    g.add_argument("--humaneval-cut", help=f"{' or '.join(CUTS)}: cut completions at the first blank line "
                                           "(default, the reference), or also before a top-level def/class/if/print")
    g.add_argument("--decoding", help=f"{', '.join(DECODINGS)}: reference (default) = the checkpoint's "
                                      "generation_config, HumanEval at temperature 0.1, as InstructEval")
    g.add_argument("--greedy", action="store_true", help="the same as --decoding greedy (kept for old commands)")
    g.add_argument("--temperature", type=float, help="--decoding sampling: the temperature (> 0)")
    g.add_argument("--top-p", type=float, help="--decoding sampling: nucleus mass in (0, 1] (default 1.0)")
    g.add_argument("--seeds", help="comma-separated seeds: each sampled task runs once per seed, the score is the "
                                   "mean (required by --decoding sampling)")
    g.add_argument("--dtype", help=f"{', '.join(DTYPES)} (default fp32, the reference; auto = bf16 on a GPU)")
    g.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                   help="merge the adapter into the weights in fp32 before casting to --dtype (default: unmerged, "
                        "the reference)")
    g.add_argument("--mmlu-cells", help=f"{' or '.join(MMLU_CELLS)}: MMLU's cells as the data set holds them "
                                        "(default), or as InstructEval's pandas read its CSVs (None -> nan, 2 -> 2.0)")
    g.add_argument("--attn-implementation", help=f"{' or '.join(ATTN_IMPLEMENTATIONS)} (default sdpa; eager: "
                                                 "Llama's attention in 2023, InstructEval's)")
    g.add_argument("--tokenizer", help=f"{' or '.join(TOKENIZERS)} (default fast; slow: the SentencePiece "
                                       "tokenizer InstructEval loaded)")
    p.add_argument("--canonical", action="store_true", help="score HumanEval's canonical solutions (no model)")
    p.add_argument("--completions", help="score HumanEval completions from a JSONL file (task_id, completion)")
    return p


def spec_from_args(args) -> EvaluationSpec:
    """The spec: --config's fields, overridden by the flags given; ProtocolError (one line) when invalid."""
    fields = read_config(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if k not in NOT_SPEC and v is not None}
    if "seeds" in given:
        try:
            given["seeds"] = [int(x) for x in given["seeds"].split(",") if x.strip()]
        except ValueError:
            raise ProtocolError(f"--seeds {args.seeds!r} is invalid: give comma-separated integers, e.g. 0,1,2") \
                from None
    if args.greedy:
        if given.get("decoding", "greedy") != "greedy":
            raise ProtocolError(f"--greedy contradicts --decoding {given['decoding']}: give one of them")
        given["decoding"] = "greedy"
    fields.update(given)
    fields.setdefault("out", time.strftime("runs/eval/%Y%m%d-%H%M%S"))
    return EvaluationSpec.from_dict(fields)


def read_config(path: str) -> dict:
    import json

    try:
        text = Path(path).read_text()
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except (OSError, ValueError) as e:  # yaml.YAMLError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"--config {path} cannot be read ({type(e).__name__}): give a YAML or JSON file of "
                            "spec fields") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"--config {path} must hold a mapping of spec fields (evaluation/spec.py)")
    return data


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from evaluation import runner

    try:
        spec = spec_from_args(args)
        if args.canonical or args.completions:
            return _score_only(args, spec)
        if spec.harness == "lm-eval":
            return _lm_eval(spec)
        result = runner.evaluate(spec)
    except EvalError as e:  # ProtocolError included
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(runner.table(result))
    print(f"written: {spec.out}/scores.json")
    return 0


def _score_only(args, spec: EvaluationSpec) -> int:
    from evaluation import runner

    if spec.task_list() != ["humaneval"] or (args.canonical and args.completions):
        raise EvalError("--canonical and --completions score HumanEval alone: pass --tasks humaneval and one of them")
    result = runner.score_completions(None if args.canonical else runner.read_completions(args.completions),
                                      canonical=args.canonical, data_dir=spec.data_dir, limit=spec.limit,
                                      workers=spec.workers, out=spec.out)
    print(runner.table(result))
    missing = result["tasks"]["humaneval"].get("missing")
    if missing:
        print(f"warning: {missing} HumanEval problems had no completion and were not scored", file=sys.stderr)
    print(f"written: {spec.out}/scores.json")
    return 0


def _lm_eval(spec: EvaluationSpec) -> int:
    from evaluation import harness

    result = harness.evaluate(spec.base, spec.adapter, spec.tasks, limit=spec.limit, batch_size=spec.batch_size,
                              device=spec.device, dtype=spec.dtype, out=spec.out, include_path=spec.include_path,
                              tracking_uri=spec.tracking_uri, protocol=spec.protocol())
    print(harness.table(result))
    print(f"written: {spec.out}/scores.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
