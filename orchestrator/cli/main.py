"""Command line of the orchestrator (runs on a login node; never imports torch).

    python -m orchestrator --algo nomad                       # tiny study on this machine (the default)
    python -m orchestrator --algo tpe --config study.yaml --budget 100 --parallel 4 --executor slurm
    python -m orchestrator --study tiny-nomad --resume        # after a crash or a logout
    python -m orchestrator status --study tiny-nomad          # progress and best, from the journal and SLURM
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe        # studies side by side
    python -m orchestrator evaluate --study tiny-nomad --top 10 --include-default   # downstream scores
    python -m orchestrator confirm --study tiny-nomad --top 3 --seeds 3     # retrain the best with new seeds
    python -m orchestrator server start --auth                # the lab's MLflow server (orchestrator/tracking/server.py)

Exit codes: 0 done; 1 the study ran but every evaluation failed; 2 bad input or a study that cannot run
(one line on stderr, nothing written); 130 interrupted (jobs go on; --resume re-attaches them).
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from orchestrator.config import (RESUMABLE, STUDY_PRESETS, ConfigError, StudyConfig, load_config, read_yaml,
                                 resume_changes)
from orchestrator.search.searchers import ALGOS
from slurm.backend import KINDS

SUBCOMMANDS = ("run", "status", "register", "compare", "evaluate", "confirm", "plots", "ui", "server")
RUN_FIELDS = ("algo", "preset", "budget", "parallel", "executor", "study", "workdir", "tracking_uri", "seed",
              "register_as", "objective", "poll_s", "warm_start")


def run_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m orchestrator", description=(
        "Tune LoRA hyperparameters (rank, alpha, dropout, learning rate) with NOMAD or TPE; every evaluation "
        "is a submitit job; everything is tracked in MLflow. Subcommands: status, register, compare, evaluate, "
        "confirm, plots, ui, server (python -m orchestrator SUBCOMMAND --help)."))
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
    p.add_argument("--warm-start", dest="warm_start", nargs="+", metavar="STUDY",
                   help="earlier studies (same space and settings) whose results the searcher learns first")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the study from its journal (may change only: {', '.join(RESUMABLE)})")
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="print the resolved config, the first suggestions, the first trial's spec and batch script; "
                        "submit and write nothing")
    return p


def study_parser(command: str) -> argparse.ArgumentParser:
    p = OneLineParser(prog=f"python -m orchestrator {command}")
    if command == "compare":
        p.add_argument("studies", nargs="+", help="study names")
        p.add_argument("--out", help="also write the table to this file (JSON if it ends in .json, else Markdown)")
    else:
        p.add_argument("--study", required=True, help="study name")
    if command == "plots":
        p.add_argument("--out", help="where to write them (default: the study folder's plots/)")
    p.add_argument("--workdir", default="runs", help="where study folders are (default: runs)")
    p.add_argument("--tracking-uri", dest="tracking_uri", help="MLflow tracking URI")
    if command in ("register", "confirm"):
        p.add_argument("--register-as", dest="register_as", help="registered model name ('' : do not register)")
    if command == "confirm":
        p.add_argument("--top", type=int, default=3, help="the K successful trials of lowest loss (3)")
        p.add_argument("--seeds", type=int, default=3, help="new seeds per point (3)")
        p.add_argument("--rule", choices=("mean", "upper"), default="mean",
                       help="mean: the lowest mean loss; upper: the lowest upper 95%% bound of the mean")
        p.add_argument("--executor", choices=KINDS, help="default: the study's")
        p.add_argument("--poll", dest="poll_s", type=float, default=5.0, help="seconds between job polls (5)")
    if command == "evaluate":
        p.add_argument("--top", type=int, default=10, help="evaluate the K successful trials of lowest loss (10)")
        p.add_argument("--include-default", action="store_true", help="also the trial at the default point")
        p.add_argument("--executor", choices=KINDS, help="default: the study's")
        p.add_argument("--poll", dest="poll_s", type=float, default=5.0, help="seconds between job polls (5)")
        p.add_argument("--retry-failed", dest="retry_failed", action="store_true",
                       help="submit again the evaluations that failed before")
        g = p.add_argument_group("protocol (default: the study YAML's `evaluation:` section, else InstructEval's)")
        g.add_argument("--harness", choices=("instructeval", "lm-eval"),
                       help="instructeval: the paper's protocol; lm-eval: lm-evaluation-harness tasks")
        g.add_argument("--tasks", help="comma-separated (default: mmlu,bbh,drop,humaneval; lm-eval: required)")
        g.add_argument("--limit", type=int, help="first N examples per task / subject (smoke tests)")
        g.add_argument("--data-dir", dest="data_dir", help="local benchmark folders (evaluation/data.py)")
        g.add_argument("--include-path", dest="include_path", help="lm-eval: a folder of your own task YAMLs")
        g.add_argument("--seed", type=int, help="DROP demonstrations and sampling (0)")
        g.add_argument("--humaneval-cut", dest="humaneval_cut", choices=("blank-line", "top-level"))
        g.add_argument("--decoding", choices=("reference", "greedy", "sampling"))
        g.add_argument("--greedy", action="store_true", help="the same as --decoding greedy")
        g.add_argument("--temperature", type=float, help="with --decoding sampling")
        g.add_argument("--top-p", dest="top_p", type=float, help="with --decoding sampling")
        g.add_argument("--seeds", help="with --decoding sampling: comma-separated seeds, one run each")
        g.add_argument("--dtype", choices=("fp32", "bf16", "fp16", "auto"))
        g.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                       help="merge the adapter into the weights (in fp32) before evaluating (default: no)")
        g.add_argument("--batch-size", dest="batch_size", type=int)
    return p


def resumed_config(args) -> StudyConfig:
    """On --resume the journal's config is the study's; only RESUMABLE values may change, others are refused."""
    from orchestrator.study.journal import Journal

    name = args.study or load_config(args.config, preset=args.preset, algo=args.algo).study
    journal = Journal(Path(args.workdir or "runs") / name / "journal.jsonl")
    saved = journal.load().config if journal.exists() else None
    if saved is None:
        raise ConfigError(f"--resume: no journal for study {name!r} under {args.workdir or 'runs'}: "
                          "check --study and --workdir, or drop --resume")
    study = StudyConfig.from_journal(saved, workdir=args.workdir)
    saved = study.to_dict()  # in today's plain form: a journal written by an older version compares as well
    wanted = {k: getattr(args, k) for k in RUN_FIELDS if k not in ("study", "workdir")}
    if args.config:  # the keys the YAML sets, in their normalized form
        full = load_config(args.config).to_dict()
        wanted.update({k: full[k] for k in read_yaml(args.config) if k in full and k not in ("study", "workdir")})
    changed = resume_changes(saved, wanted)
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)} of study {name!r} (it was started with "
                          f"other values); a resume may change only {', '.join(RESUMABLE)}: drop the other flags")
    return StudyConfig.from_journal(saved, budget=args.budget, poll_s=args.poll_s, workdir=args.workdir)


def claim_fresh_name(config: StudyConfig) -> str | None:
    """A default study name never collides: the first `<name>`, `<name>-2`, ... whose folder this process
    creates itself (mkdir is atomic: two starts at once get two names). Returns the original name if renamed."""
    base, n = config.study, 1
    while True:
        try:
            (Path(config.workdir) / config.study).mkdir(parents=True)
            return base if config.study != base else None
        except FileExistsError:
            n += 1
            config.study = f"{base}-{n}"


def quiet_libraries(http_retries: int = 0) -> None:
    """Third-party chatter off the console (MLflow's table creation, alembic's migrations), and MLflow's HTTP
    client bounded (a study's writes go through a durable queue that retries itself: 0; one-shot commands: 2)."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow configures its loggers
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # a study's records go to its own store only
    os.environ.setdefault("DO_NOT_TRACK", "true")
    for name in ("alembic", "mlflow", "urllib3", "nni"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("HF_HUB_VERBOSITY", "DATASETS_VERBOSITY"):  # a hub that cannot be reached is said once, in our
        os.environ.setdefault(name, "error")                   # error line, not by each of its retries
    # MLflow retries an unreachable server for minutes by default; the outbox retries on its own schedule
    from jobs.tracking_store import http_settings
    os.environ.update(http_settings(retries=http_retries, timeout_s=30))


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag or value said in one line (and exit 2), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def interrupt_on_termination() -> None:
    """SIGTERM and SIGHUP (a closed terminal, a job scheduler stopping the login-node process) behave like
    Ctrl-C: jobs go on, the journal is whole, `--resume` continues."""
    def interrupt(signum, frame):
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)  # whoever handles Ctrl-C now handles this
        raise KeyboardInterrupt  # SIGINT ignored (started in the background, nohup): stop as Ctrl-C would
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def printable_output() -> None:
    """Whatever a job wrote into a failure reason (a file name with undecodable bytes: lone surrogates), printing
    it never raises: under a strict UTF-8 locale (en_US.UTF-8, the usual one) print() would, mid-study."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and stream.errors in ("strict", "surrogateescape"):
            stream.reconfigure(errors="backslashreplace")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    printable_output()
    command = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "run"
    if command == "server":
        from orchestrator.tracking import server
        return server.main(argv)
    if threading.current_thread() is threading.main_thread():
        interrupt_on_termination()
    quiet_libraries(http_retries=0 if command == "run" else 2)
    if command == "ui":
        from orchestrator.cli.ui import main as ui
        return ui(argv)
    if command != "run":
        from orchestrator.cli import commands
        return commands.main(command, study_parser(command).parse_args(argv))
    args = run_parser().parse_args(argv)
    from jobs.tracking_store import StoreError, check_store
    from orchestrator.jsonl import DamagedFile
    from orchestrator.study import StudyError
    from orchestrator.study.lock import LockError
    from orchestrator.study.loop import run_study
    config = None
    try:
        if args.resume:
            config = resumed_config(args)
        else:
            config = load_config(args.config, **{k: getattr(args, k) for k in RUN_FIELDS})
        if args.dry_run:
            from orchestrator.cli.dry_run import dry_run
            dry_run(config)
            return 0
        _check_workdir(config)
        check_store(config.tracking(), experiment=config.study)
        created = None
        if not args.resume and args.study is None and config.study == f"{config.preset}-{config.algo}":
            renamed, created = claim_fresh_name(config), True
            if renamed:
                print(f"note: a study named {renamed!r} exists already: this one is {config.study!r}", flush=True)
        state = run_study(config, resume=args.resume, created=False if args.resume else created)
    except (ConfigError, StudyError, LockError, StoreError, DamagedFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: the disk is full ({e.filename or 'writing the study'}): free space, then continue with "
              f"python -m orchestrator --study {config.study if config else '...'} --resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        name = config.study if config else "NAME"
        print(f"\ninterrupted: running jobs go on; continue with: python -m orchestrator --study {name} --resume",
              file=sys.stderr)
        return 130
    if state.finished and all(t.status == "failed" for t in state.finished):
        print(f"error: every evaluation of study {config.study!r} failed (see the reasons above)", file=sys.stderr)
        return 1
    return 0


def _check_workdir(config: StudyConfig) -> None:
    workdir = Path(config.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file: give a folder for the study folders")
    probe = workdir if workdir.exists() else next((p for p in workdir.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"--workdir {workdir} is not writable: give a folder you can write")


if __name__ == "__main__":
    sys.exit(main())
