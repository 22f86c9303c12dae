"""The one champion rule: which trials of a study are its best, in order. Every reader uses it: the study's end
(what is registered), `register`, `evaluate --top K`, `confirm --top K`, `compare` and `status`.

    judge = Judge(config)                       # the study's constraints, objectives and champion_rule
    ranked = ranking(state.finished, judge)     # successful trials, best first
    best = champion(state.finished, judge)      # what the study registers (None: no trial qualifies)

- One objective: the successful trials that satisfy every constraint, by objective value (validation loss, or
  the held-out objective), ties by trial number. An infeasible trial is never a champion.
- One objective with `champion_rule: mean` (noisy losses): the same trials, ranked by a Gaussian process's
  mean of the loss at each trial's point (orchestrator/search/model_mean.py), so that a lucky draw next to
  worse neighbours does not become the champion; fewer than its MIN_TRIALS trials: by objective value.
- Two objectives: the trial `champion_rule:` picks among the feasible ones (the Pareto front's knee by
  default, or "min METRIC s.t. ..."), then the rest of the front by the first objective, then every other
  feasible trial by the first objective. A rule that no trial satisfies names no champion (nothing is
  registered) but the ranking still lists the front.
"""
from __future__ import annotations

from typing import Iterable

from jobs.contract import OK
from orchestrator.search.criteria import pareto_front, pick


def _key(t):
    return (t.value, t.trial)


def ranking(trials: Iterable, judge) -> list:
    """The successful, feasible trials of `trials`, best first by the study's rule (module docstring)."""
    return _rank(trials, judge)[0]


def champion(trials: Iterable, judge):
    """The study's champion: the first of the ranking (two objectives: the rule's pick; None when no trial
    satisfies the rule)."""
    return _rank(trials, judge)[1]


def top(trials: Iterable, judge, k: int) -> list:
    """The first k of the ranking (evaluate --top, confirm --top)."""
    return ranking(trials, judge)[:k]


def _by_mean(ranked: list, judge) -> list:
    """One objective: `ranked` (by value) re-ranked by the model's mean when the study's rule is mean."""
    if not getattr(judge, "mean", False):
        return ranked
    from orchestrator.search.model_mean import rank_by_model_mean
    order = rank_by_model_mean([t.point for t in ranked], [t.value for t in ranked], judge.space)
    return [ranked[i] for i in order]


def _rank(trials: Iterable, judge) -> tuple[list, object]:
    ok = [t for t in trials if t.status == OK and t.value is not None]
    if not judge.active:
        ranked = _by_mean(sorted(ok, key=_key), judge)
        return ranked, (ranked[0] if ranked else None)
    verdicts = {t.trial: judge.after(t.status, t.value, t.summary) for t in ok}
    feasible = [t for t in ok if verdicts[t.trial].feasible]
    if not judge.objectives:
        ranked = _by_mean(sorted(feasible, key=_key), judge)
        return ranked, (ranked[0] if ranked else None)
    vectors = {t.trial: verdicts[t.trial].told for t in feasible if isinstance(verdicts[t.trial].told, tuple)}
    by_first = lambda t: (vectors[t.trial][0], t.trial)  # noqa: E731
    candidates = [t for t in feasible if t.trial in vectors]
    chosen = pick(judge.rule, vectors, {k: verdicts[k].metrics for k in vectors}) if vectors else None
    front = pareto_front(vectors)
    head = [t for t in candidates if t.trial == chosen]
    on_front = sorted((t for t in candidates if t.trial in front and t.trial != chosen), key=by_first)
    rest = sorted((t for t in candidates if t.trial not in front and t.trial != chosen), key=by_first)
    return head + on_front + rest, (head[0] if head else None)
