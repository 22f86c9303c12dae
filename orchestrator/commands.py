"""Subcommands that read a study rather than run it: status, register, compare.

    python -m orchestrator status --study tiny-nomad
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe --out comparison.md
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from orchestrator.config import DEFAULT_TRACKING_URI, ConfigError, load_config
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


DOWNSTREAM = ("mmlu", "bbh", "drop", "humaneval")  # child-run metrics logged by the downstream evaluation


def compare(args) -> int:
    """Studies side by side: printed, logged as compare.md / compare.json into each study's parent run, and
    written to --out (JSON if it ends in .json, else Markdown)."""
    rows = [_compare_row(name, _load(args.workdir, name), args.tracking_uri) for name in args.studies]
    table = _compare_table(rows)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    markdown = _markdown(table, widths)
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "studies": rows}
    for row in rows:
        if row["parent_run_id"] and row["tracking_uri"]:
            try:
                client = _client(row["tracking_uri"])
                client.log_text(row["parent_run_id"], markdown, "compare.md")
                client.log_dict(row["parent_run_id"], data, "compare.json")
            except Exception as e:  # the table is printed anyway: a store we cannot write is a warning
                print(f"warning: comparison not logged to study {row['study']!r}: {e}", file=sys.stderr)
    if getattr(args, "out", None):
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n" if out.suffix == ".json" else markdown)
    return 0


def _compare_row(name: str, state: StudyState, tracking_uri: str | None) -> dict:
    cfg = state.config or {}
    done = sorted(state.finished, key=lambda t: t.trial)
    best = _best(state)
    within = None
    if best:  # evaluations needed to come within 1% of the study's best
        running_best = float("inf")
        for i, t in enumerate(done, 1):
            if t.status == "ok":
                running_best = min(running_best, t.value)
            if running_best <= best.value * 1.01:
                within = i
                break
    job_hours = sum(t.summary.get("total_s") or 0 for t in done) / 3600
    resources = cfg.get("resources") or {}
    gpus = int(resources.get("gpus_per_node") or 0) * int(resources.get("nodes") or 1)
    uri = _tracking_uri(tracking_uri or cfg.get("tracking_uri"))
    if uri is None:
        print(f"warning: study {name!r}: its MLflow store is not here (give --tracking-uri): no downstream scores, "
              "comparison not logged", file=sys.stderr)
    return {"study": name, "algo": cfg.get("algo"), "used": len(done), "budget": cfg.get("budget"),
            "best_val_loss": best.value if best else None, "best_trial": best.trial if best else None,
            "best_point": best.point if best else None, "to_within_1pct": within,
            "failed": sum(t.status == "failed" for t in done), "job_hours": job_hours, "gpus_per_job": gpus,
            "gpu_hours": job_hours * gpus if gpus else None,
            "downstream": _downstream(uri, best.run_id) if best and best.run_id and uri else {},
            "parent_run_id": state.parent_run_id, "tracking_uri": uri}


def _tracking_uri(uri: str | None) -> str | None:
    """The study's store, or None where a local SQLite file does not exist (a read must not create one)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None
    return uri


def _client(uri: str):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri)


def _downstream(uri: str, run_id: str) -> dict:
    try:
        metrics = _client(uri).get_run(run_id).data.metrics
    except Exception as e:
        print(f"warning: no downstream scores for run {run_id}: {e}", file=sys.stderr)
        return {}
    return {k: metrics[k] for k in DOWNSTREAM if k in metrics}


def _compare_table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per study; a downstream column only where some study has that score."""
    scores = [k for k in DOWNSTREAM if any(k in r["downstream"] for r in rows)]
    header = ["study", "algo", "used", "best", "to 1%", "failed", "job-hours", "GPU-hours"] + scores + ["best point"]
    lines = [header]
    for r in rows:
        best = r["best_point"]
        lines.append([r["study"], str(r["algo"]), f"{r['used']}/{r['budget']}",
                      f"{r['best_val_loss']:.4f}" if best else "-", str(r["to_within_1pct"] or "-"), str(r["failed"]),
                      f"{r['job_hours']:.2f}", f"{r['gpu_hours']:.2f}" if r["gpu_hours"] is not None else "-"]
                     + [f"{100 * r['downstream'][k]:.2f}" if k in r["downstream"] else "-" for k in scores]
                     + [point_text(best, list(best)) if best else "-"])
    return lines


def _markdown(table: list[list[str]], widths: list[int]) -> str:
    cells = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [cells(table[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [cells(r) for r in table[1:]]
    note = ("best: lowest validation loss; to 1%: evaluations until within 1% of it; GPU-hours: job-hours x GPUs "
            "per job (resources.gpus_per_node x nodes; '-' for CPU jobs); downstream scores (percent) are the best "
            "trial's, where logged.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(command: str, args) -> int:
    try:
        if command == "evaluate":
            from orchestrator.evaluate import main as evaluate  # imports submitit: only when asked
            return evaluate(args)
        return {"status": status, "register": register, "compare": compare}[command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

