"""Command line of the orchestrator (runs on a login node; never imports torch).

    python -m orchestrator --algo nomad                       # tiny study on this machine (the default)
    python -m orchestrator --algo tpe --config study.yaml --budget 100 --parallel 4 --executor slurm
    python -m orchestrator --study tiny-nomad --resume        # after a crash or a logout
    python -m orchestrator status --study tiny-nomad          # progress and best, from the journal
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe        # studies side by side
    python -m orchestrator evaluate --study tiny-nomad --top 10 --include-default   # downstream scores
    python -m orchestrator server start --auth                # the lab's MLflow server (orchestrator/server.py)
"""
from __future__ import annotations

import argparse
import sys

from orchestrator.config import STUDY_PRESETS, ConfigError, StudyConfig, load_config
from orchestrator.searchers import ALGOS
from slurm.executors import KINDS

SUBCOMMANDS = ("run", "status", "register", "compare", "evaluate", "server")


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m orchestrator", description=(
        "Tune LoRA hyperparameters (rank, alpha, dropout, learning rate) with NOMAD or TPE; every evaluation "
        "is a submitit job; everything is tracked in MLflow. Subcommands: status, register, compare, evaluate, server "
        "(python -m orchestrator SUBCOMMAND --help)."))
    p.add_argument("--algo", choices=ALGOS, help="search algorithm (default: nomad)")
    p.add_argument("--config", help="study YAML (see orchestrator/config.py for its keys)")
    p.add_argument("--preset", choices=list(STUDY_PRESETS), help="base settings: tiny (default) or paper")
    p.add_argument("--budget", type=int, help="number of evaluations")
    p.add_argument("--parallel", type=int, help="evaluations in flight at once")
    p.add_argument("--executor", choices=KINDS, help="auto: SLURM when sbatch works, else local processes")
    p.add_argument("--study", help="study name (MLflow experiment, folder under --workdir)")
    p.add_argument("--workdir", help="where study folders go (default: runs)")
    p.add_argument("--tracking-uri", dest="tracking_uri",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db)")
    p.add_argument("--seed", type=int, help="searcher seed")
    p.add_argument("--register-as", dest="register_as", help="registered model name for the best adapter")
    p.add_argument("--objective", help="tune a Python blackbox instead: package.module:function")
    p.add_argument("--poll", dest="poll_s", type=float, help="seconds between job-state polls")
    p.add_argument("--resume", action="store_true", help="continue the study from its journal")
    return p


def study_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m orchestrator {command}")
    if command == "compare":
        p.add_argument("studies", nargs="+", help="study names")
        p.add_argument("--out", help="also write the table to this file (JSON if it ends in .json, else Markdown)")
    else:
        p.add_argument("--study", required=True, help="study name")
    p.add_argument("--workdir", default="runs", help="where study folders are (default: runs)")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
    if command == "register":
        p.add_argument("--register-as", dest="register_as", help="registered model name")
    if command == "evaluate":
        p.add_argument("--top", type=int, default=10, help="evaluate the K successful trials of lowest loss (10)")
        p.add_argument("--include-default", action="store_true", help="also the trial at the default point")
        p.add_argument("--harness", default="instructeval", choices=("instructeval", "lm-eval"),
                       help="instructeval: the paper's protocol (default); lm-eval: lm-evaluation-harness tasks")
        p.add_argument("--tasks", help="comma-separated (default: mmlu,bbh,drop,humaneval; lm-eval: required)")
        p.add_argument("--limit", type=int, help="first N examples per task / subject (smoke tests)")
        p.add_argument("--data-dir", dest="data_dir", help="local benchmark folders (evaluation/data.py)")
        p.add_argument("--include-path", dest="include_path", help="lm-eval: a folder of your own task YAMLs")
        p.add_argument("--seed", type=int, default=0, help="DROP demonstrations and HumanEval sampling (0)")
        p.add_argument("--greedy", action="store_true", help="greedy HumanEval instead of T=0.1")
        p.add_argument("--executor", choices=KINDS, help="default: the study's")
        p.add_argument("--poll", dest="poll_s", type=float, default=5.0, help="seconds between job polls (5)")
        p.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                       help="submit again the evaluations that failed before")
    return p


def resumed_config(args) -> StudyConfig:
    """On --resume the journal's config is the study's; only the budget may be raised."""
    from orchestrator.journal import Journal

    name = args.study or load_config(args.config, preset=args.preset, algo=args.algo).study
    journal = Journal(f"{args.workdir or 'runs'}/{name}/journal.jsonl")
    saved = journal.load().config if journal.exists() else None
    if saved is None:
        raise ConfigError(f"--resume: no journal for study {name!r} under {args.workdir or 'runs'}: "
                          "check --study and --workdir, or drop --resume")
    saved = {k: v for k, v in saved.items() if k != "executor_resolved"}
    config = load_config(None, **{**saved, "budget": args.budget or saved["budget"],
                                  "poll_s": args.poll_s or saved["poll_s"]})
    return config


def _fresh_name(config: StudyConfig) -> str:
    from pathlib import Path

    name, n = config.study, 1
    while (Path(config.workdir) / name / "journal.jsonl").exists():
        n += 1
        name = f"{config.study}-{n}"
    return name


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    if command == "server":
        from orchestrator import server
        return server.main(argv)
    if command != "run":
        from orchestrator import commands
        return commands.main(command, study_parser(command).parse_args(argv))
    args = run_parser().parse_args(argv)
    try:
        if args.resume:
            config = resumed_config(args)
        else:
            fields = ("algo", "preset", "budget", "parallel", "executor", "study", "workdir", "tracking_uri",
                      "seed", "register_as", "objective", "poll_s")
            config = load_config(args.config, **{k: getattr(args, k) for k in fields})
            if args.study is None and config.study == f"{config.preset}-{config.algo}":
                config.study = _fresh_name(config)  # a default name never collides with an earlier study
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from orchestrator.study import StudyError, run_study
    try:
        run_study(config, resume=args.resume)
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: running jobs go on; continue with: python -m orchestrator --study "
              f"{config.study} --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
