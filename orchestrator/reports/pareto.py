"""Two objectives: the front's table and picture, logged to the study's parent run (pareto/).

    write_pareto(state, judge, folder, reference)   # pareto.md, pareto.json, pareto.png
"""
from __future__ import annotations

import json
from pathlib import Path

from orchestrator.search.champion import champion
from orchestrator.search.criteria import hypervolume, pareto_front
from orchestrator.search.pareto import points_of, reference_of


def write_pareto(state, judge, folder, reference=None) -> dict:
    """The front as pareto.md/.json/.png in `folder`; returns the JSON data."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vectors, _ = points_of(state, judge)
    front = pareto_front(vectors)
    ref = reference_of(vectors, reference)
    best = champion(state.finished, judge)
    names = list(judge.objectives)
    rows = [{"trial": k, names[0]: v[0], names[1]: v[1], "point": state.trials[k].point}
            for k, v in sorted(front.items(), key=lambda kv: kv[1])]
    data = {"objectives": names, "front": rows, "reference": list(ref), "hypervolume": hypervolume(front, ref),
            "champion": best.trial if best else None, "rule": judge.rule if judge.rule == "knee" else
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
