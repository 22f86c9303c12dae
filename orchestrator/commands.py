"""Subcommands that read a study rather than run it: status, register, compare.

    python -m orchestrator status --study tiny-nomad
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe
"""
from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.config import ConfigError, load_config
from orchestrator.journal import Journal, StudyState
from orchestrator.progress import point_text


def _load(workdir: str, study: str) -> StudyState:
    journal = Journal(Path(workdir) / study / "journal.jsonl")
    if not journal.exists():
        raise ConfigError(f"no study {study!r} under {workdir}: check the name and --workdir")
    return journal.load()


def _best(state: StudyState):
    ok = [t for t in state.finished if t.status == "ok"]
    return min(ok, key=lambda t: t.value) if ok else None


def status(args) -> int:
    state = _load(args.workdir, args.study)
    cfg = state.config
    names = [k for k in (state.trials[min(state.trials)].point if state.trials else {})]
    done = sorted(state.finished, key=lambda t: t.trial)
    print(f"study {args.study}: {cfg['algo']}, budget {cfg['budget']}, parallel {cfg['parallel']}, "
          f"executor {cfg.get('executor_resolved')}; {'ended' if state.ended else 'not ended'}")
    print(f"done {len(done)} ({sum(t.status == 'failed' for t in done)} failed), running {len(state.running)}")
    for t in sorted(state.trials.values(), key=lambda t: t.trial):
        what = {"ok": f"val_loss {t.value:.4f}", "failed": f"FAILED: {t.reason}", None: f"running (job {t.job_id})"}
        print(f"  trial {t.trial:3d} {point_text(t.point, names)}: {what[t.status]}")
    best = _best(state)
    if best:
        print(f"best: trial {best.trial}, val_loss {best.value:.4f}, {point_text(best.point, names)}")
    return 0


def register(args) -> int:
    from orchestrator.study import register_best
    from orchestrator.tracking import Tracker

    state = _load(args.workdir, args.study)
    best = _best(state)
    if best is None:
        raise ConfigError(f"study {args.study!r} has no successful trial to register")
    config = load_config(None, **{k: v for k, v in state.config.items() if k != "executor_resolved"},
                         register_as=args.register_as or state.config.get("register_as"),
                         tracking_uri=args.tracking_uri or state.config.get("tracking_uri"))
    tracker = Tracker(config.tracking(), config.study)
    info = register_best(tracker.client, config, best)
    Journal(Path(args.workdir) / args.study / "journal.jsonl").append("registered", **info)
    print(f"registered trial {best.trial} (val_loss {best.value:.4f}) as {info['name']} v{info['version']}: "
          f"{info['uri']}")
    return 0


def compare(args) -> int:
    rows = []
    for name in args.studies:
        state = _load(args.workdir, name)
        done = state.finished
        best = _best(state)
        within = None
        if best:  # evaluations needed to come within 1% of the study's best
            running_best = float("inf")
            for i, t in enumerate(sorted(done, key=lambda t: t.trial), 1):
                if t.status == "ok":
                    running_best = min(running_best, t.value)
                if running_best <= best.value * 1.01:
                    within = i
                    break
        hours = sum(t.summary.get("total_s") or 0 for t in done) / 3600
        rows.append((name, state.config["algo"], f"{len(done)}/{state.config['budget']}",
                     f"{best.value:.4f}" if best else "-", str(within or "-"),
                     str(sum(t.status == "failed" for t in done)), f"{hours:.2f}",
                     point_text(best.point, list(best.point)) if best else "-"))
    header = ("study", "algo", "used", "best", "to 1%", "failed", "job-hours", "best point")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return 0


def main(command: str, args) -> int:
    try:
        return {"status": status, "register": register, "compare": compare}[command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

