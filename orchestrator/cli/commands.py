"""Subcommands that read a study rather than run it: status, register, compare.

    python -m orchestrator status --study tiny-nomad
    python -m orchestrator register --study tiny-nomad --register-as my-adapter
    python -m orchestrator compare tiny-nomad tiny-tpe --out comparison.md
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from jobs import tracking_store
from orchestrator.config import ConfigError, load_config
from orchestrator.study.journal import StudyState
from orchestrator.study.progress import _hms, point_text


def _load(workdir: str, study: str) -> StudyState:
    from orchestrator.tracking.tracker import load_study

    folder = Path(workdir) / study
    if not (folder / "journal.jsonl").exists():
        raise ConfigError(f"no study {study!r} under {workdir}: check the name and --workdir")
    return load_study(folder)


def _best(state: StudyState):
    ok = [t for t in state.finished if t.status == "ok"]
    return min(ok, key=lambda t: t.value) if ok else None


def _value(t) -> str:
    return f"{t.value:.4f}" if isinstance(t.value, (int, float)) else "-"


def status(args) -> int:
    """Progress and best from the journal; for a live SLURM study, each running trial's job as SLURM sees it."""
    state = _load(args.workdir, args.study)
    cfg = state.config or {}
    names = list(next(iter(state.trials.values())).point) if state.trials else []
    done = sorted(state.finished, key=lambda t: t.trial)
    jobs = _scheduler_view(state, cfg)
    running = [t for t in state.running if jobs.get(t.job_id, ("RUNNING", ""))[0] not in _waiting()]
    print(f"study {args.study}: {cfg.get('algo')}, budget {cfg.get('budget')}, parallel {cfg.get('parallel')}, "
          f"executor {cfg.get('executor_resolved')}; {'ended' if state.ended else 'not ended'}")
    print(f"done {len(done)} ({sum(t.status == 'failed' for t in done)} failed), running {len(running)}, "
          f"pending {len(state.running) - len(running)}")
    for t in sorted(state.trials.values(), key=lambda t: t.trial):
        if t.status == "ok":
            what = f"val_loss {_value(t)}"
        elif t.status == "failed":
            what = f"FAILED: {t.reason}"
        else:
            what = _live_text(t, jobs.get(t.job_id))
        print(f"  trial {t.trial:3d} {point_text(t.point, names)}: {what}")
    best = _best(state)
    if best:
        print(f"best: trial {best.trial}, val_loss {_value(best)}, {point_text(best.point, names)}")
    for r in state.registered:
        print(f"registered: {r.get('uri') or r.get('name')} (version {r.get('version')}, trial {r.get('trial')})")
    return 0


def _waiting() -> set:
    from slurm.states import WAITING
    return WAITING


def _scheduler_view(state: StudyState, cfg: dict) -> dict:
    """{job id: (state, reason)} of the study's live SLURM jobs (one sacct + one squeue call); {} elsewhere."""
    ids = [t.job_id for t in state.running if t.job_id]
    if cfg.get("executor_resolved") != "slurm" or not ids:
        return {}
    from slurm.states import DispatchError, slurm_snapshot
    try:
        return {k: (v.state, v.reason) for k, v in slurm_snapshot(ids).items()}
    except DispatchError:
        return {}


def _live_text(t, job) -> str:
    if not t.job_id:
        return "being submitted"
    attempt = f", attempt {t.attempt + 1}" if t.attempt else ""
    if job is None:
        return f"running (job {t.job_id}{attempt})"
    state, reason = job
    since = f" for {_hms(time.time() - t.submitted_at)}" if t.submitted_at else ""
    return f"{state.lower()}{' (' + reason + ')' if reason else ''}{since} (job {t.job_id}{attempt})"


def register(args) -> int:
    """Register the best adapter (idempotent: the same trial gets the same version), under the study's lock."""
    from orchestrator.study.lock import LockError, StudyLock
    from orchestrator.study.end import registry_tags
    from orchestrator.tracking.tracker import Tracker, trial_key

    folder = Path(args.workdir) / args.study
    state = _load(args.workdir, args.study)
    best = _best(state)
    if best is None:
        raise ConfigError(f"study {args.study!r} has no successful trial to register")
    saved = {k: v for k, v in state.config.items() if k != "executor_resolved"}
    config = load_config(None, **{**saved, "register_as": args.register_as or saved.get("register_as"),
                                  "tracking_uri": args.tracking_uri or saved.get("tracking_uri")})
    if config.function:
        raise ConfigError(f"study {args.study!r} tuned an objective function: it has no adapter to register")
    name = config.register_as or f"{config.study}-adapter"
    try:
        lock = StudyLock(folder / "study.lock", what=f"study {args.study!r}").acquire()
    except LockError as e:
        raise ConfigError(f"{e} (it registers its champion itself when it ends)") from None
    try:
        tracker = Tracker(config.tracking(), config.study, folder, state.study_uid or "", log=print)
        seq = tracker.register(name, best.trial, registry_tags(config, best))
        if not tracker.close(wait_s=300, idle_s=60):
            raise ConfigError(f"MLflow did not take the registration ({tracker.outbox.status()}); run the "
                              "command again when the tracking server is back")
        version = tracker.outbox.result(seq)
        info = {"name": name, "version": version, "trial": best.trial,
                "run_id": tracker.run_id(trial_key(best.trial)), "uri": f"models:/{name}@champion"}
        from orchestrator.study.journal import Journal
        Journal(folder / "journal.jsonl").append("registered", **info)
    finally:
        lock.release()
    print(f"registered trial {best.trial} (val_loss {_value(best)}) as {name} v{version}: {info['uri']}")
    return 0


def _hypervolumes(rows: list[dict]) -> None:
    """Studies with two objectives: each front's hypervolume against one reference point for all of them (the
    studies' `pareto_reference` when they agree, else each objective's worst feasible value x 1.1)."""
    from orchestrator.search.criteria import hypervolume, pareto_front
    from orchestrator.search.pareto import reference_of
    two = [r for r in rows if r.get("pareto")]
    if not two:
        return
    given = {json.dumps(r["pareto"]["reference"]) for r in two}
    reference = reference_of({(r["study"], k): tuple(v) for r in two for k, v in r["pareto"]["points"].items()},
                             json.loads(given.pop()) if len(given) == 1 and "null" not in given else None)
    for r in two:
        front = pareto_front({k: tuple(v) for k, v in r["pareto"]["points"].items()})
        r["pareto"].update(hypervolume=hypervolume(front, reference), reference=list(reference), front=sorted(front))


def _score_columns(rows: list[dict]) -> list[str]:
    """The downstream score metrics present in any row: InstructEval's tasks first, then lm-eval's, by name."""
    from evaluation.tracking import INSTRUCTEVAL
    present = {k for r in rows for k in r["downstream"]}
    return [k for k in INSTRUCTEVAL if k in present] + sorted(present - set(INSTRUCTEVAL))


def compare(args) -> int:
    """Studies side by side: printed, logged as compare.md / compare.json into each study's parent run, and
    written to --out (JSON if it ends in .json, else Markdown)."""
    from evaluation.tracking import protocol_mismatch

    rows = [_compare_row(name, _load(args.workdir, name), args.tracking_uri) for name in args.studies]
    _hypervolumes(rows)
    table = _compare_table(rows)
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    mismatch = protocol_mismatch([r["protocol"] for r in rows if r["downstream"]])
    markdown = _markdown(table, widths, rows)
    if mismatch:  # scores measured under different protocols must not be read as comparable
        said = (f"the downstream scores were measured under different protocols ({', '.join(mismatch)}): do not "
                "compare them; re-evaluate with one protocol (orchestrator evaluate)")
        print(f"warning: {said}", file=sys.stderr)
        markdown += f"\n**Warning:** {said}.\n"
    data = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "studies": rows, "protocol_mismatch": mismatch}
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
    within = hours_within = None
    if best:  # evaluations (in the order results came) and wall time needed to come within 1% of the best
        running_best = float("inf")
        for i, t in enumerate(sorted(done, key=lambda t: (t.finished_at or 0, t.trial)), 1):
            if t.status == "ok":
                running_best = min(running_best, t.value)
            if running_best <= best.value * 1.01:
                within = i
                if t.finished_at and state.started_at:
                    hours_within = (t.finished_at - state.started_at) / 3600
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
            "hours_to_within_1pct": hours_within,
            "failed": sum(t.status == "failed" for t in done), "job_hours": job_hours, "gpus_per_job": gpus,
            "gpu_hours": job_hours * gpus if gpus else None,
            **_downstream(uri, best.run_id if best else None),
            "parent_run_id": state.parent_run_id, "tracking_uri": uri, "pareto": _pareto_points(state)}


def _pareto_points(state: StudyState) -> dict | None:
    cfg = {k: v for k, v in (state.config or {}).items() if k != "executor_resolved"}
    if not cfg.get("objectives"):
        return None
    from orchestrator.search.criteria import Judge
    from orchestrator.search.pareto import points_of
    judge = Judge(load_config(None, **cfg))
    vectors, _ = points_of(state, judge)
    return {"objectives": list(judge.objectives), "points": {str(k): list(v) for k, v in vectors.items()},
            "reference": cfg.get("pareto_reference")}


def _tracking_uri(uri: str | None) -> str | None:
    """The study's store, or None where a local SQLite file does not exist (a read must not create one)."""
    uri = tracking_store.resolve(uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return None
    return uri


def _client(uri: str):
    return tracking_store.client(uri)


def _downstream(uri: str | None, run_id: str | None) -> dict:
    """{"downstream": the best run's scores, "protocol": the protocol they were measured under}."""
    from evaluation.tracking import is_score_metric, protocol_of

    if not (uri and run_id):
        return {"downstream": {}, "protocol": {}}
    try:
        run = _client(uri).get_run(run_id)
    except Exception as e:
        print(f"warning: no downstream scores for run {run_id}: {e}", file=sys.stderr)
        return {"downstream": {}, "protocol": {}}
    scores = {k: v for k, v in run.data.metrics.items() if is_score_metric(k)}
    return {"downstream": scores, "protocol": protocol_of(run) if scores else {}}


def _compare_table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per study; a downstream column only where some study has that score."""
    scores = _score_columns(rows)
    pareto = any(r.get("pareto") for r in rows)
    header = ["study", "algo", "used", "best", "to 1%", "h to 1%", "failed", "job-hours", "GPU-hours"] + scores + \
        (["hypervolume"] if pareto else []) + ["best point"]
    lines = [header]
    for r in rows:
        best = r["best_point"]
        lines.append([r["study"], str(r["algo"]), f"{r['used']}/{r['budget']}",
                      f"{r['best_val_loss']:.4f}" if best else "-", str(r["to_within_1pct"] or "-"),
                      f"{r['hours_to_within_1pct']:.2f}" if r["hours_to_within_1pct"] is not None else "-",
                      str(r["failed"]),
                      f"{r['job_hours']:.2f}", f"{r['gpu_hours']:.2f}" if r["gpu_hours"] is not None else "-"]
                     + [f"{100 * r['downstream'][k]:.2f}" if k in r["downstream"] else "-" for k in scores]
                     + ([f"{r['pareto']['hypervolume']:.4g}" if r.get("pareto") else "-"] if pareto else [])
                     + [point_text(best, list(best)) if best else "-"])
    return lines


def _markdown(table: list[list[str]], widths: list[int], rows: list[dict]) -> str:
    cells = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [cells(table[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [cells(r) for r in table[1:]]
    refs = {json.dumps(r["pareto"]["reference"]) for r in rows if r.get("pareto")}
    hv = f"; hypervolume: the area the Pareto front dominates up to the reference point {refs.pop()}" if refs else ""
    note = ("best: lowest validation loss; to 1%: evaluations (in the order their results came) until within 1% of "
            "it; h to 1%: wall-clock hours from the study's start to that result; GPU-hours: job-hours x GPUs "
            "per job (resources.gpus_per_node x nodes; '-' for CPU jobs); downstream scores (percent) are the best "
            f"trial's, where logged{hv}.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def main(command: str, args) -> int:
    try:
        if command == "evaluate":
            from orchestrator.study.evaluate import main as evaluate  # imports submitit: only when asked
            return evaluate(args)
        if command == "confirm":
            from orchestrator.study.confirm import main as confirm
            return confirm(args)
        return {"status": status, "register": register, "compare": compare}[command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

