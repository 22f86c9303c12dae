"""Blind human preference between two models (the paper's human study): the command line.

    python -m evaluation.preference generate study.db --a-adapter models:/NAME@champion --b-base tiny
    python -m evaluation.preference serve study.db --raters alice,bob
    python -m evaluation.preference raters study.db --add carol
    python -m evaluation.preference report study.db

The study's data and statistics are evaluation/preference_store.py's (its names are available here too), the
rating page evaluation/preference_app.py's, the raters' tokens evaluation/preference_raters.py's.
"""
from __future__ import annotations

import argparse
import sys

from evaluation.preference_store import (BUNDLED_QUESTIONS, MAX_ID_CHARS, EvalError, answers, assign_sides,
                                         connect, create_study, log_report, markdown, meta, open_study,
                                         preference, question_ids, read_questions, record_vote, votes,
                                         write_study)

__all__ = ["BUNDLED_QUESTIONS", "MAX_ID_CHARS", "EvalError", "answers", "assign_sides", "connect", "create_study",
           "log_report", "main", "markdown", "meta", "open_study", "parser", "preference", "question_ids",
           "read_questions", "record_vote", "votes", "write_study"]


# --------------------------------------------------------------------------------------------------- CLI
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluation.preference", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    g = sub.add_parser("generate", help="answers of models A and B into a new study file")
    g.add_argument("study", help="the study file to create (SQLite)")
    for s in ("a", "b"):
        g.add_argument(f"--{s}-base", help=f"model {s.upper()}'s base: hub id, folder or tiny (default: the "
                                           "adapter's base, else tiny)")
        g.add_argument(f"--{s}-adapter", help=f"model {s.upper()}'s adapter: folder, runs:/... or models:/NAME@ALIAS "
                                              "(default: none, the base alone)")
        g.add_argument(f"--{s}-seed", type=int, help=f"model {s.upper()}'s sampling seed (default: --seed)")
    g.add_argument("--questions", help="JSONL of {question_id, category, question} (default: the bundled 30)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit in tokens (256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: seeded sampling")
    g.add_argument("--seed", type=int, default=0, help="sampling seed for both sides (0)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (8)")
    g.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    s = sub.add_parser("serve", help="the blind rating web page")
    s.add_argument("study")
    s.add_argument("--raters", help="add these raters (comma-separated) and print their tokens; names that "
                                    "exist already keep theirs")
    s.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1; another exposes the study)")
    s.add_argument("--port", type=int, default=8765, help="port (8765; 0 picks a free one)")
    s.add_argument("--workers", type=int, default=8, help="threads answering requests (8)")
    s.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send its whole request before it is closed (30)")
    a = sub.add_parser("raters", help="add raters or reissue a token (each token is printed once); list raters")
    a.add_argument("study")
    a.add_argument("--add", help="new raters, comma-separated")
    a.add_argument("--reissue", help="a rater whose token is replaced (lost or leaked); ends their sessions")
    r = sub.add_parser("report", help="A vs B preference, logged to MLflow")
    r.add_argument("study")
    r.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the project's "
                                          "store sqlite:///mlruns/mlflow.db)")
    r.add_argument("--run-id", help="attach to this run (default: a new run in experiment 'preference')")
    r.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (2000)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    r.add_argument("--no-mlflow", action="store_true", help="print the report only")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.step == "generate":
            if args.max_new_tokens < 1 or args.temperature < 0:
                raise EvalError("--max-new-tokens must be >= 1 and --temperature >= 0")
            seeds = {s: args.seed if getattr(args, f"{s}_seed") is None else getattr(args, f"{s}_seed") for s in "ab"}
            sides = {s.upper(): {"base": getattr(args, f"{s}_base"), "adapter": getattr(args, f"{s}_adapter"),
                                 "seed": seeds[s]} for s in "ab"}
            settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                        "batch_size": args.batch_size, "device": args.device,
                        "questions": str(args.questions or BUNDLED_QUESTIONS)}
            path = create_study(args.study, sides, read_questions(args.questions), settings)
            print(f"written: {path}\nnext: python -m evaluation.preference serve {path}")
        elif args.step == "serve":
            from evaluation.preference_app import serve
            serve(args.study, host=args.host, port=args.port, new_raters=args.raters, workers=args.workers,
                  idle_timeout=args.idle_timeout)
        elif args.step == "raters":
            from evaluation.preference_raters import manage_raters
            manage_raters(args.study, args.add, args.reissue)
        else:
            con = open_study(args.study)
            result = preference(votes(con), n_boot=args.bootstrap, seed=args.seed)
            info = meta(con)
            print(markdown(result, info))
            if not args.no_mlflow:
                print(f"logged to MLflow run {log_report(result, info, args.tracking_uri, args.run_id)}")
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
