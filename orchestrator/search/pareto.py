"""Two objectives at once: the study's Pareto front, its table and picture, and the champion the rule picks.

    front = front_of(state, judge)          # {trial: (objective 1, objective 2)} of the feasible finished trials
    champion = champion_of(state, judge)    # the trial `champion_rule:` picks (default: the front's knee)
    write_pareto(state, judge, folder)      # pareto.md, pareto.json, pareto.png: logged to the parent run

Both objectives are minimized; infeasible and failed trials are not on the front. The hypervolume is the area
the front dominates up to a reference point (`pareto_reference:`, else each objective's worst feasible value
x 1.1), stated beside it wherever it is printed (compare, the table).
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.search.criteria import hypervolume, pareto_front, pick


def points_of(state, judge) -> tuple[dict, dict]:
    """({trial: objective vector}, {trial: metrics}) of the feasible successful trials."""
    vectors, metrics = {}, {}
    for t in state.finished:
        if t.status != "ok":
            continue
        verdict = judge.after(t.status, t.value, t.summary)
        if verdict.feasible or not judge.constraints:
            if isinstance(verdict.told, tuple):
                vectors[t.trial], metrics[t.trial] = verdict.told, verdict.metrics
    return vectors, metrics


def front_of(state, judge) -> dict:
    return pareto_front(points_of(state, judge)[0])


def champion_of(state, judge):
    vectors, metrics = points_of(state, judge)
    key = pick(judge.rule, vectors, metrics) if vectors else None
    return state.trials[key] if key is not None else None


def reference_of(vectors: dict, given=None) -> tuple[float, float]:
    if given:
        return tuple(float(v) for v in given)
    return tuple(max(v[i] for v in vectors.values()) * 1.1 for i in (0, 1)) if vectors else (1.0, 1.0)


def write_pareto(state, judge, folder, reference=None) -> dict:
    """The front as pareto.md/.json/.png in `folder`; returns the JSON data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors, _ = points_of(state, judge)
    front = pareto_front(vectors)
    ref = reference_of(vectors, reference)
    champion = champion_of(state, judge)
    names = list(judge.objectives)
    rows = [{"trial": k, names[0]: v[0], names[1]: v[1], "point": state.trials[k].point}
            for k, v in sorted(front.items(), key=lambda kv: kv[1])]
    data = {"objectives": names, "front": rows, "reference": list(ref), "hypervolume": hypervolume(front, ref),
            "champion": champion.trial if champion else None, "rule": judge.rule if judge.rule == "knee" else
            f"min {judge.rule[0]}" + "".join(f" s.t. {m} {op} {v:g}" for m, op, v in judge.rule[1])}
    lines = [f"| trial | {names[0]} | {names[1]} | point |", "|---|---|---|---|"]
    lines += [f"| {r['trial']}{' (champion)' if r['trial'] == data['champion'] else ''} | {r[names[0]]:.4g} | "
              f"{r[names[1]]:.4g} | {json.dumps(r['point'])} |" for r in rows]
    (folder / "pareto.md").write_text("\n".join(lines) + f"\n\nhypervolume {data['hypervolume']:.4g} against the "
                                      f"reference point {list(ref)}; champion rule: {data['rule']}\n")
    (folder / "pareto.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    _draw(vectors, front, data, folder / "pareto.png")
    return data


def _draw(vectors: dict, front: dict, data: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    names = data["objectives"]
    if vectors:
        ax.scatter([v[0] for v in vectors.values()], [v[1] for v in vectors.values()], s=18, alpha=0.5,
                   color="gray", label="feasible trials")
        pts = sorted(front.values())
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="#ff7f0e", lw=2, label="Pareto front")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#ff7f0e", zorder=3)
        if data["champion"] is not None:
            c = vectors[data["champion"]]
            ax.scatter([c[0]], [c[1]], marker="*", s=200, color="#d62728", zorder=4,
                       label=f"champion (trial {data['champion']})")
        ax.legend(fontsize=8)
    ax.set(xlabel=names[0], ylabel=names[1], title=f"Pareto front, hypervolume {data['hypervolume']:.4g}")
    ax.grid(alpha=0.3)
    fig.savefig(path)
