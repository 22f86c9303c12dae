"""Subcommands that read a study rather than run it: status, register, compare, plots.

    python -m orchestrator status --study tiny-nomad
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe --out comparison.md
    python -m orchestrator plots --study tiny-nomad [--out DIR]

Each reads the study through `open_study` (its journal and typed configuration) and names its best trial by the
study's champion rule (orchestrator/search/champion.py); MLflow writes go through a Tracker.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from jobs import tracking_store
from orchestrator.config import ConfigError
from orchestrator.jsonl import DamagedFile
from orchestrator.reports.text import hms, point_text
from orchestrator.search.champion import champion
from orchestrator.search.criteria import Judge
from orchestrator.study.journal import Journal, open_study
from orchestrator.study.progress import PROGRESS_FILE
from orchestrator.study.spend import Spend
from orchestrator.tracking.tracker import Tracker
from slurm.backend import describe_jobs
from slurm.states import WAITING



def _value(t) -> str:
    return f"{t.value:.4f}" if isinstance(t.value, (int, float)) else "-"


def status(args) -> int:
    """Progress and champion from the journal; for a live SLURM study, each running trial's job as SLURM sees it."""
    state, config = open_study(args.workdir, args.study)
    names = list(config.space.names)
    done = sorted(state.finished, key=lambda t: t.trial)
    jobs = describe_jobs(state.executor, [t.job.job_id for t in state.running if t.job.job_id])
    running = [t for t in state.running if jobs.get(t.job.job_id, ("RUNNING", "", None))[0] not in WAITING]
    print(f"study {args.study}: {config.algo}, budget {config.budget}, parallel {config.parallel}, "
          f"executor {state.executor}; {'ended' if state.ended else 'not ended'}")
    print(f"done {len(done)} ({sum(t.status == 'failed' for t in done)} failed), running {len(running)}, "
          f"pending {len(state.running) - len(running)}")
    spend = Spend(config.gpu_hours, config.resources)
    print(f"spent: {spend.text(state, {})} by the finished trials (every attempt; the running ones: see the "
          "orchestrator's line)" if config.gpu_hours else f"spent: {spend.text(state, {})} by the finished trials")
    progress = _progress_line(Path(args.workdir) / args.study, state)
    if progress:
        print(progress)
    for t in sorted(state.trials.values(), key=lambda t: t.trial):
        if t.ok:
            what = f"val_loss {_value(t)}"
        elif t.status is not None:
            what = f"{t.status.upper()}: {t.reason}"
        else:
            what = _live_text(t, jobs.get(t.job.job_id))
        print(f"  trial {t.trial:3d} {point_text(t.point, names)}: {what}")
    best = champion(state.finished, Judge(config))
    if best:
        print(f"champion: trial {best.trial}, val_loss {_value(best)}, {point_text(best.point, names)}")
    for r in state.registered:
        print(f"registered: {r.get('uri') or r.get('name')} (version {r.get('version')}, trial {r.get('trial')})")
    return 0


def _progress_line(folder: Path, state) -> str | None:
    """The running orchestrator's last status line (its outages included), with its age."""
    if state.ended:
        return None
    try:
        path = folder / PROGRESS_FILE
        line, age = path.read_text().strip(), time.time() - path.stat().st_mtime
    except OSError:
        return None
    return f"orchestrator ({hms(age)} ago): {line}" if line else None


def _live_text(t, job) -> str:
    if not t.job.job_id:
        return "being submitted"
    attempt = f", attempt {t.job.attempt + 1}" if t.job.attempt else ""
    if job is None:
        return f"submitted (job {t.job.job_id}{attempt})"
    state, reason, started = job
    if state in WAITING:
        since = f" for {hms(time.time() - t.job.submitted_at)}" if t.job.submitted_at else ""
        return f"pending{' (' + reason + ')' if reason else ''}{since} (job {t.job.job_id}{attempt})"
    if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"):
        return f"job {state.lower()}, result not recorded yet (the study records it at its next poll) " \
               f"(job {t.job.job_id}{attempt})"
    since = f" for {hms(time.time() - started)}" if started else ""
    return f"{state.lower()}{since} (job {t.job.job_id}{attempt})"


def register(args) -> int:
    """Register the study's champion (idempotent: the same trial gets the same version), under the study's lock."""
    from orchestrator.study import end
    from orchestrator.study.lock import LockError, StudyLock

    folder = Path(args.workdir) / args.study
    state, config = open_study(args.workdir, args.study, register_as=args.register_as,
                               tracking_uri=args.tracking_uri)
    if config.function:
        raise ConfigError(f"study {args.study!r} tuned an objective function: it has no adapter to register")
    judge = Judge(config)
    best = champion(state.finished, judge)
    if best is None:
        raise ConfigError(f"study {args.study!r} has no trial its champion rule names (no successful feasible "
                          "trial): nothing to register")
    if config.register_name is None:
        raise ConfigError("--register-as '' registers nothing: give a model name")
    try:
        lock = StudyLock(folder / "study.lock", what=f"study {args.study!r}").acquire()
    except LockError as e:
        raise ConfigError(f"{e} (it registers its champion itself when it ends)") from None
    try:
        journal = Journal(folder / "journal.jsonl")
        tracker = Tracker(config.tracking(), config.study, folder / "mlflow-outbox.jsonl", state.study_uid or "")
        queued = end.queue_registration(config, state, tracker, judge)
        if not tracker.close(wait_s=300, idle_s=60):
            raise ConfigError(f"MLflow did not take the registration ({tracker.status()}); run the command again "
                              "when the tracking server is back")
        info = end.journal_registration(config, state, journal, tracker, queued)
    finally:
        lock.release()
    print(f"registered trial {best.trial} (val_loss {_value(best)}) as {info['name']} v{info['version']}: "
          f"{info['uri']}")
    return 0


def compare(args) -> int:
    """Studies side by side: printed, logged as compare.md / compare.json into each study's parent run, and
    written to --out (JSON if it ends in .json, else Markdown)."""
    from evaluation.tracking import protocol_mismatch
    from orchestrator.reports.compare import add_hypervolumes, compare_row, compare_table, markdown

    rows = []
    for name in args.studies:
        state, config = open_study(args.workdir, name, tracking_uri=args.tracking_uri)
        uri = _existing_store(config.tracking())
        if uri is None:
            print(f"warning: study {name!r}: its MLflow store is not here (give --tracking-uri): no downstream "
                  "scores, comparison not logged", file=sys.stderr)
        rows.append(compare_row(name, state, config, uri, tracking_store.client(uri) if uri else None))
    add_hypervolumes(rows)
    table = compare_table(rows)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    mismatch = protocol_mismatch([r["protocol"] for r in rows if r["downstream"]])
    text = markdown(table, widths, rows)
    if mismatch:  # scores measured under different protocols must not be read as comparable
        said = (f"the downstream scores were measured under different protocols ({', '.join(mismatch)}): do not "
                "compare them; re-evaluate with one protocol (orchestrator evaluate)")
        print(f"warning: {said}", file=sys.stderr)
        text += f"\n**Warning:** {said}.\n"
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "studies": rows, "protocol_mismatch": mismatch}
    _log_comparison(rows, text, data)
    if getattr(args, "out", None):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n" if out.suffix == ".json" else text)
    return 0


def _log_comparison(rows: list[dict], text: str, data: dict) -> None:
    """compare.md and compare.json into each study's parent run (the table is printed anyway: a store that
    cannot be written is a warning)."""
    with tempfile.TemporaryDirectory(prefix="lora-hpo-compare-") as tmp:
        for k, row in enumerate(rows):
            if not (row["parent_run_id"] and row["tracking_uri"]):
                continue
            tracker = Tracker(row["tracking_uri"], row["study"], Path(tmp) / f"outbox-{k}.jsonl", "compare",
                              log=lambda line: print(line, file=sys.stderr))
            key = f"run:{row['parent_run_id']}"
            tracker.log_text(key, text, "compare.md", run_id=row["parent_run_id"])
            tracker.log_dict(key, data, "compare.json", run_id=row["parent_run_id"])
            if not tracker.close(wait_s=60, idle_s=30):
                print(f"warning: comparison not logged to study {row['study']!r}: {tracker.status()}", file=sys.stderr)


def _existing_store(uri: str) -> str | None:
    """The study's store, or None where a local SQLite file does not exist (a read must not create one)."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None
    return uri


def plots(args) -> int:
    """Draw a study's plots (PNG and interactive HTML) into --out (default: the study folder's plots/)."""
    from orchestrator.reports.plots import write_plots

    state, _ = open_study(args.workdir, args.study)
    for path in write_plots(state, args.out or Path(args.workdir) / args.study / "plots"):
        print(path)
    return 0


def main(command: str, args) -> int:
    try:
        if command == "evaluate":
            from orchestrator.study.evaluate import main as evaluate  # imports submitit: only when asked
            return evaluate(args)
        if command == "confirm":
            from orchestrator.study.confirm import main as confirm
            return confirm(args)
        return {"status": status, "register": register, "compare": compare, "plots": plots}[command](args)
    except (ConfigError, DamagedFile) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
