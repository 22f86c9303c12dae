"""Studies side by side (`python -m orchestrator compare A B`): one row per study, the table and its Markdown.

    rows = [compare_row(name, state, config, uri) for ...]; add_hypervolumes(rows)
    table = compare_table(rows); text = markdown(table, rows)

"best" is the study's champion (orchestrator/search/champion.py): the same trial the study registered.
"""
from __future__ import annotations

import json
import sys

from jobs.contract import metrics_of
from orchestrator.reports.text import point_text
from orchestrator.search.champion import champion
from orchestrator.search.criteria import Judge


def compare_row(name: str, state, config, uri: str | None, client=None) -> dict:
    """One study's row: its champion, evaluations and hours to within 1% of it, failures, job- and GPU-hours,
    the champion's downstream scores (read from `client`'s store, where logged), its Pareto points."""
    judge = Judge(config)
    done = sorted(state.finished, key=lambda t: t.trial)
    best = champion(state.finished, judge)
    within = hours_within = spend_within = None
    if best:  # evaluations (in the order results came), wall time and GPU-hours needed to come within 1% of it
        running_best, spent = float("inf"), 0.0
        for i, t in enumerate(sorted(done, key=lambda t: (t.finished_at or 0, t.trial)), 1):
            spent += metrics_of(t.summary).get("gpu_hours", 0.0)
            if t.ok:
                running_best = min(running_best, t.value)
            if running_best <= best.value * 1.01:
                within, spend_within = i, spent
                if t.finished_at and state.started_at:
                    hours_within = (t.finished_at - state.started_at) / 3600
                break
    job_hours = sum(metrics_of(t.summary).get("total_hours", 0.0) for t in done)
    spent = sum(metrics_of(t.summary).get("gpu_hours", 0.0) for t in done)
    gpus = config.resources.gpus_per_node * config.resources.nodes
    return {"study": name, "algo": config.algo, "used": len(done), "budget": config.budget,
            "best_val_loss": best.value if best else None, "best_trial": best.trial if best else None,
            "best_point": best.point if best else None, "to_within_1pct": within,
            "hours_to_within_1pct": hours_within, "spend_to_within_1pct": spend_within, "spend": spent,
            "spend_unit": "GPU-h" if gpus else "CPU-h", "gpu_hours_budget": config.gpu_hours,
            "failed": sum(t.status == "failed" for t in done), "job_hours": job_hours, "gpus_per_job": gpus,
            "gpu_hours": spent if gpus else None,
            **downstream(client, best.run_id if best else None),
            "parent_run_id": state.parent_run_id, "tracking_uri": uri, "pareto": pareto_points(state, judge, config)}


def pareto_points(state, judge, config) -> dict | None:
    if not judge.objectives:
        return None
    from orchestrator.search.pareto import points_of
    vectors, _ = points_of(state, judge)
    return {"objectives": list(judge.objectives), "points": {str(k): list(v) for k, v in vectors.items()},
            "reference": list(config.pareto_reference) if config.pareto_reference else None}


def downstream(client, run_id: str | None) -> dict:
    """{"downstream": the run's scores, "protocol": the protocol they were measured under}."""
    from evaluation.tracking import is_score_metric, protocol_of

    if not (client and run_id):
        return {"downstream": {}, "protocol": {}}
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - the table is printed anyway
        print(f"warning: no downstream scores for run {run_id}: {e}", file=sys.stderr)
        return {"downstream": {}, "protocol": {}}
    scores = {k: v for k, v in run.data.metrics.items() if is_score_metric(k)}
    return {"downstream": scores, "protocol": protocol_of(run) if scores else {}}


def add_hypervolumes(rows: list[dict]) -> None:
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


def compare_table(rows: list[dict]) -> list[list[str]]:
    """Header and one line per study; a downstream column only where some study has that score."""
    scores = _score_columns(rows)
    pareto = any(r.get("pareto") for r in rows)
    header = ["study", "algo", "used", "best", "to 1%", "h to 1%", "failed", "job-hours", "GPU-hours",
              "GPU-h to 1%"] + scores + \
        (["hypervolume"] if pareto else []) + ["best point"]
    lines = [header]
    for r in rows:
        best = r["best_point"]
        lines.append([r["study"], str(r["algo"]), f"{r['used']}/{r['budget']}",
                      f"{r['best_val_loss']:.4f}" if best else "-", str(r["to_within_1pct"] or "-"),
                      f"{r['hours_to_within_1pct']:.2f}" if r["hours_to_within_1pct"] is not None else "-",
                      str(r["failed"]),
                      f"{r['job_hours']:.2f}", f"{r['gpu_hours']:.2f}" if r["gpu_hours"] is not None else "-",
                      f"{r['spend_to_within_1pct']:.2f}" if r["gpu_hours"] is not None and
                      r["spend_to_within_1pct"] is not None else "-"]
                     + [f"{100 * r['downstream'][k]:.2f}" if k in r["downstream"] else "-" for k in scores]
                     + ([f"{r['pareto']['hypervolume']:.4g}" if r.get("pareto") else "-"] if pareto else [])
                     + [point_text(best, list(best)) if best else "-"])
    return lines


def markdown(table: list[list[str]], widths: list[int], rows: list[dict]) -> str:
    cells = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    lines = [cells(table[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [cells(r) for r in table[1:]]
    refs = {json.dumps(r["pareto"]["reference"]) for r in rows if r.get("pareto")}
    hv = f"; hypervolume: the area the Pareto front dominates up to the reference point {refs.pop()}" if refs else ""
    note = ("best: the champion (the lowest loss among feasible trials, or the champion rule's pick); to 1%: "
            "evaluations (in the order their results came) until within 1% of it; h to 1%: wall-clock hours from the study's start to that result; GPU-hours: every attempt's "
            "elapsed time x GPUs allocated, from SLURM accounting ('-' for CPU jobs); GPU-h to 1%: those spent "
            "until that result; downstream scores (percent) are the best "
            f"trial's, where logged{hv}.")
    return "\n".join(lines) + "\n\n" + note + "\n"
