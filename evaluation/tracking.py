"""Downstream scores for MLflow: what one trial's scores write into its child run, the poster's table, reads.

    from evaluation.tracking import score_writes, collect, poster_table, poster_metrics, protocol_mismatch
    metrics, tags, files = score_writes(result, tags)   # result: evaluation.evaluate(...) or scores.json
    rows = collect(client, [parent_run_id])             # every evaluated child run of the study (or studies)
    protocol_mismatch(rows)                             # [] when every row was scored under one protocol
    table = poster_table(rows, top=10)                  # per algo: min / max / mean / sd over the 10 best

Login-node code: MLflow only, never torch. The writes themselves are the orchestrator's Tracker's
(orchestrator/tracking/tracker.py log_scores, log_poster): jobs write scores.json into their output folder and
never touch the tracking store.

Metric names: the InstructEval-protocol scores keep their task names (`mmlu`, `bbh`, `drop`, `humaneval`);
lm-evaluation-harness scores are prefixed `lm_eval.` because its protocols differ (an lm-eval `mmlu` is
not the paper's MMLU number). The table's sd is the sample standard deviation (n - 1); '-' for one model.

Protocol: every choice that changes a score (evaluation.spec.EvaluationSpec.protocol(): harness, HumanEval
cut, decoding, temperature, top-p, seeds, dtype, merge, limit, seed) is a tag `eval.protocol.<key>` of the run
that holds the scores, and the decoding each task really used (the reference protocol reads it from the
checkpoint) is `eval.decoding.<task>.<setting>`. Tags, not params: a run evaluated again under another protocol
gets the new values with the new scores (params cannot change). `protocol_mismatch(rows)` names the keys
whose values differ between runs, for a table that must not mix protocols silently.
"""
from __future__ import annotations

import json
import math
import re
import statistics

from evaluation.generate import NEUTRAL  # torch-free at import

INSTRUCTEVAL = ("mmlu", "bbh", "drop", "humaneval")
LM_EVAL_PREFIX = "lm_eval."
STATS = ("min", "max", "mean", "sd")
DEFAULT_ROW = "default"
PROTOCOL_PREFIX = "eval.protocol."  # evaluation.spec.PROTOCOL_PREFIX (spec.py imports the task modules)
DECODING_PREFIX = "eval.decoding."
# the sampling settings, then those a checkpoint's file can add under decoding: reference ("none" = neutral)
DECODING_SETTINGS = ("do_sample", "temperature", "top_p", "top_k", *NEUTRAL)


def metric_name(task: str, harness: str = "instructeval") -> str:
    """The MLflow metric name of a task's score (MLflow refuses characters outside [\\w\\-. /])."""
    name = re.sub(r"[^\w\-. /]", "_", task)
    return LM_EVAL_PREFIX + name if harness == "lm-eval" else name


def is_score_metric(name: str) -> bool:
    return name in INSTRUCTEVAL or name.startswith(LM_EVAL_PREFIX)


def score_writes(result: dict, tags: dict | None = None) -> tuple[dict, dict, dict]:
    """What an evaluation's result writes into its run: ({metric: value} of `result["scores"]` (None scores
    left out), {tag: value} (harness, protocol, decoding, and `tags`), {artifact file: JSON data} (the scores
    without per-example records, and per-task breakdowns under eval/))."""
    harness = result.get("harness", "instructeval")
    metrics = {metric_name(task, harness): float(v) for task, v in result.get("scores", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    all_tags = {k: str(v)[:5000] for k, v in {"eval_harness": harness, **protocol_tags(result), **(tags or {})}.items()
                if v is not None}
    slim = {**result, "tasks": {n: {k: v for k, v in t.items() if k != "records"}
                                for n, t in result.get("tasks", {}).items()}}
    files = {"eval/scores.json": json.loads(json.dumps(slim, default=str))}
    for task, summary in slim["tasks"].items():
        breakdown = summary.get("groups") or summary.get("breakdown")
        if breakdown:
            files[f"eval/breakdown/{metric_name(task, harness)}.json"] = breakdown
    return metrics, all_tags, files


def protocol_tags(result: dict) -> dict[str, str]:
    """`eval.protocol.*` from the result's protocol, `eval.decoding.<task>.<setting>` from its decoding."""
    tags = {k: str(v) for k, v in (result.get("protocol") or {}).items() if k.startswith(PROTOCOL_PREFIX)}
    for task, decoding in (result.get("decoding") or {}).items():  # every setting, so none is left stale
        tags.update({f"{DECODING_PREFIX}{metric_name(task)}.{k}": str(decoding.get(k)).lower()
                     for k in DECODING_SETTINGS})
    return tags


def protocol_of(run) -> dict[str, str]:
    """The protocol tags of a run: an MLflow Run, a collect() row, or a plain {tag: value} dict."""
    if hasattr(run, "data"):
        tags = run.data.tags
    elif isinstance(run, dict) and "protocol" in run:
        tags = run["protocol"]
    else:
        tags = run
    return {k: v for k, v in tags.items() if k.startswith((PROTOCOL_PREFIX, DECODING_PREFIX))}


def protocol_mismatch(runs) -> list[str]:
    """The protocol keys whose values differ between `runs` (MLflow Runs, collect() rows or tag dicts); [] when
    they were all scored under one protocol. A run without a key (scored before protocols were logged, or by
    another harness) differs from one that has it; a task's decoding is compared only between runs that
    scored that task."""
    protocols = [protocol_of(r) for r in runs]
    keys = sorted({k for p in protocols for k in p})
    differing = []
    for key in keys:
        if key.startswith(DECODING_PREFIX):
            task = key[len(DECODING_PREFIX):].rsplit(".", 1)[0]
            values = {p.get(key) for p in protocols if any(k.startswith(f"{DECODING_PREFIX}{task}.") for k in p)}
        else:
            values = {p.get(key) for p in protocols}
        if len(values) > 1:
            differing.append(key)
    return differing


def collect(client, parent_run_ids: list[str]) -> list[dict]:
    """One row per evaluated child run of the given parents: run id, trial, algo, val_loss, whether the run is
    at the default point (tag eval_default=true), its score metrics and its protocol tags."""
    rows = []
    for parent in parent_run_ids:
        experiment = client.get_run(parent).info.experiment_id
        runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'", max_results=50000)
        for run in runs:
            scores = {k: v for k, v in run.data.metrics.items() if is_score_metric(k)}
            if not scores:
                continue
            tags = run.data.tags
            rows.append({"run_id": run.info.run_id, "trial": int(tags.get("trial", -1)), "algo": tags.get("algo"),
                         "val_loss": run.data.metrics.get("val_loss"), "default": tags.get("eval_default") == "true",
                         "scores": scores, "protocol": protocol_of(run)})
    return rows


def poster_table(rows: list[dict], top: int) -> dict:
    """The poster's comparison: for each algo, min / max / mean / sd of every score over its `top` evaluated
    runs of lowest validation loss; then a "default" row over the runs at the default point.

    A run at the default point also counts for its algo when its loss ranks it among the top. Returns
    {"top": K, "scores": [...], "rows": [{"method", "n", "trials", "stats": {score: {min, max, mean, sd}}}]}."""
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r} is invalid: must be an integer >= 1")
    scores = sorted({k for r in rows for k in r["scores"]}, key=lambda k: (k not in INSTRUCTEVAL, _order(k)))
    table_rows = []
    for algo in sorted({r["algo"] for r in rows if r["val_loss"] is not None}, key=str):
        ranked = sorted((r for r in rows if r["algo"] == algo and r["val_loss"] is not None),
                        key=lambda r: (r["val_loss"], r["trial"]))[:top]
        table_rows.append(_row(str(algo), ranked, scores))
    defaults = sorted((r for r in rows if r["default"]), key=lambda r: r["trial"])
    if defaults:
        table_rows.append(_row(DEFAULT_ROW, defaults, scores))
    return {"top": top, "scores": scores, "rows": table_rows}


def _order(name: str):
    return INSTRUCTEVAL.index(name) if name in INSTRUCTEVAL else name


def _row(method: str, runs: list[dict], scores: list[str]) -> dict:
    stats = {}
    for k in scores:
        values = [r["scores"][k] for r in runs if k in r["scores"]]
        stats[k] = {"min": min(values), "max": max(values), "mean": statistics.fmean(values),
                    "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values)} if values else None
    return {"method": method, "n": len(runs), "trials": [r["trial"] for r in runs], "stats": stats}


def markdown(table: dict) -> str:
    """The table as Markdown: one line per method, 'mean ± sd [min, max]' per score, in percent."""
    header = ["method", "models"] + table["scores"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table["rows"]:
        cells = [row["method"], str(row["n"])]
        for k in table["scores"]:
            s = row["stats"].get(k)
            sd = "" if s is None or s["sd"] is None else f" ± {100 * s['sd']:.2f}"
            span = "" if s is None else f" [{100 * s['min']:.2f}, {100 * s['max']:.2f}]"
            cells.append("-" if s is None else f"{100 * s['mean']:.2f}{sd}{span}")
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"Scores in percent: mean ± sample sd [min, max] over each method's {table['top']} evaluated models of "
            "lowest validation loss (fewer where fewer were evaluated: see models); default: the model(s) trained "
            "at the default point.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def poster_metrics(table: dict) -> dict:
    """Flat parent-run metrics: top{K}_{stat}_{score} for a single method (prefixed `{algo}.` when the table
    holds several), default_{score} for the default row's mean."""
    methods = [r for r in table["rows"] if r["method"] != DEFAULT_ROW]
    out = {}
    for row in table["rows"]:
        for k, s in row["stats"].items():
            if s is None:
                continue
            if row["method"] == DEFAULT_ROW:
                out[f"default_{k}"] = s["mean"]
                continue
            prefix = f"{row['method']}." if len(methods) > 1 else ""
            out.update({f"{prefix}top{table['top']}_{stat}_{k}": s[stat] for stat in STATS if s[stat] is not None})
    return out
