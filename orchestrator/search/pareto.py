"""Two objectives at once: the study's Pareto front and the hypervolume's reference point.

    vectors, metrics = points_of(state, judge)   # {trial: (objective 1, objective 2)} of the feasible trials
    front = front_of(state, judge)               # the non-dominated ones
    # the champion: orchestrator/search/champion.py; the table and picture: orchestrator/reports/pareto.py

Both objectives are minimized; infeasible and failed trials are not on the front. The hypervolume is the area
the front dominates up to a reference point (`pareto_reference:`, else each objective's worst feasible value
x 1.1), stated beside it wherever it is printed (compare, the table).
"""
from __future__ import annotations

from jobs.contract import OK
from orchestrator.search.criteria import pareto_front


def points_of(state, judge) -> tuple[dict, dict]:
    """({trial: objective vector}, {trial: metrics}) of the feasible successful trials."""
    vectors, metrics = {}, {}
    for t in state.finished:
        if t.status != OK:
            continue
        verdict = judge.after(t.status, t.value, t.summary)
        if verdict.feasible or not judge.constraints:
            if isinstance(verdict.told, tuple):
                vectors[t.trial], metrics[t.trial] = verdict.told, verdict.metrics
    return vectors, metrics


def front_of(state, judge) -> dict:
    return pareto_front(points_of(state, judge)[0])


def reference_of(vectors: dict, given=None) -> tuple[float, float]:
    if given:
        return tuple(float(v) for v in given)
    return tuple(max(v[i] for v in vectors.values()) * 1.1 for i in (0, 1)) if vectors else (1.0, 1.0)
