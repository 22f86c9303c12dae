"""Searchers behind one ask/tell protocol: ``nomad`` (MADS), ``tpe`` (NNI; Optuna's for two objectives or with
option ``sampler: optuna``),
``random``, ``default``.

The study loop owns the loop; a searcher only proposes and listens::

    searcher = make_searcher("nomad", paper_space(), budget=100, parallel=4, seed=0, options={},
                             n_objectives=1, constraints=("pb", "eb"))
    searcher.warm_start(earlier)                  # optional: earlier studies' results (see below)
    adopted = searcher.replay(history, pending)   # on resume, before any ask (see below)
    while not searcher.finished:
        s = searcher.ask()                   # whenever a slot is free (up to `parallel` pending)
        ...                                  # submit s.point; later, when its result arrives:
        searcher.tell(s.trial_id, loss, constraints=[c1, c2])   # loss None = failed evaluation
    searcher.close()

``ask()`` returns None when it has nothing to propose *right now* (NOMAD's ``paper`` profile waits
for its block's results, the budget or every slot is taken by pending trials) or ever again (then
``finished`` is True). NOMAD's ``async`` profile, TPE and random fill a freed slot at once.
Every searcher counts replayed and told results against ``budget`` and never hands out more than
``budget`` suggestions in total, nor one while ``parallel`` trials are pending.
A non-finite value is told as a failure.

Criteria (constraints and two objectives)
-----------------------------------------
``constraints`` is a tuple of kinds, one per constraint, in the order their values are told: ``"pb"``
(NOMAD's progressive barrier: a violation is tolerated on the way, penalized) or ``"eb"`` (extreme
barrier: a violating point is never accepted). A constraint value follows NOMAD's convention,
``c <= 0`` satisfied. ``tell(trial_id, value, constraints=None)``:

- ``value``: a float (``n_objectives=1``), a tuple of two floats (``n_objectives=2``, both
  minimized), or None for a failed trial. A non-finite number in it makes it a failure.
- ``constraints``: a list of one float per constraint, or None. None (or anything) with
  ``value=None`` is a failure: the constraint values of a failed trial are not used. With a value,
  a study that has constraints must give all of them (None is then a ValueError: tell a failure
  instead); a non-finite constraint value makes the trial a failure (it cannot be judged).
- A value of the wrong shape (a pair with one objective, a float with two) or a constraints list
  of the wrong length is a ValueError naming it, and nothing changes.

What each searcher does with them (each module says more): NOMAD ``paper`` declares them to NOMAD
(``BB_OUTPUT_TYPE OBJ [OBJ] PB EB ...``, DMultiMADS for two objectives); NOMAD ``async`` keeps
extreme-barrier points out of its incumbent and model and runs a progressive-barrier-like rule
for pb (async_mads.py), and refuses two objectives; TPE (NNI) tells an infeasible trial as a
penalized value or a failure (option ``infeasible``), and with two objectives is Optuna's
multi-objective TPE with its ``constraints_func`` (optuna_tpe.py); random and default ignore values.
``n_objectives=2`` with ``default`` is refused.

Resume: ``replay(history, pending)`` takes the previous run's finished results (``Observation``:
point, value, trial_id, constraints, exactly as they were told) and
the trials that were still running when it died (``Pending``: their jobs are re-attached, not
resubmitted). It returns one ``Suggestion`` per pending entry, in order, carrying the journal's
``trial_id``: those trials are pending exactly like freshly asked ones (they hold budget and
parallel slots, their points are never proposed again) and are settled by the usual
``tell(trial_id, value)``. New trial ids exceed every replayed and pending id. More pending trials
than ``parallel`` (or than the budget left) are adopted all the same, with a warning: their jobs run
already; nothing new is proposed until they are told.

Warm start: ``warm_start(observations)`` gives the searcher the finished results of earlier studies
(``Observation``s of the same space and criteria; their trial ids are ignored). It is called at most
once, **before** ``replay`` and before the first ``ask`` (else a RuntimeError); a resumed study calls
it again with the same observations, then ``replay``, so that the searcher is rebuilt as it was.
Warm results count against no budget and hold no slot, and their points are never proposed again;
the searcher learns from them (NOMAD ``paper``: they are its starting points, X0, the best first;
``async``: its incumbent and model; TPE: NNI's ``import_data`` or Optuna's ``add_trial``).

Each algorithm lives in its own module, imported only when built, so that ``PyNomad``, ``nni`` and
``optuna`` stay behind one module each.

Try it: ``python bench/hpo_efficiency.py --seeds 2 --budgets 25`` runs them on a synthetic landscape;
``python bench/parallel_efficiency.py --seeds 2 --k 1 4 --algos nomad tpe random`` simulates K slots;
``python bench/multi_criteria.py --seeds 2`` runs constrained and bi-objective studies.
"""
from __future__ import annotations

from orchestrator.search.searchers.base import (KINDS, Ledger, LedgerSearcher, Observation, Pending, Searcher,
                                                Suggestion, clean_result, clean_value, rank, violation)
from orchestrator.search.space import SearchSpace

ALGOS = ("nomad", "tpe", "random", "default")
MULTI_OBJECTIVE = ("nomad", "tpe", "random")   # the algos that search two objectives
__all__ = ["ALGOS", "MULTI_OBJECTIVE", "KINDS", "Ledger", "LedgerSearcher", "Observation", "Pending", "Searcher",
           "Suggestion", "clean_result", "clean_value", "make_searcher", "rank", "violation"]


def make_searcher(algo: str, space: SearchSpace, *, budget: int, parallel: int, seed: int,
                  options: dict | None = None, n_objectives: int = 1, constraints: tuple = ()) -> Searcher:
    """Build the searcher named ``algo`` (one of ALGOS). ``options`` are the algorithm's own;
    ``n_objectives`` (1 or 2) and ``constraints`` (kinds, "pb" | "eb", one per constraint) say what
    ``tell`` will be given (see the module docstring)."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is unknown; valid: {list(ALGOS)}")
    for what, value in (("budget", budget), ("parallel", parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    if n_objectives not in (1, 2) or isinstance(n_objectives, bool):
        raise ValueError(f"n_objectives={n_objectives!r} must be 1 or 2")
    if n_objectives == 2 and algo not in MULTI_OBJECTIVE:
        raise ValueError(f"algo={algo!r} cannot search two objectives; use one of {list(MULTI_OBJECTIVE)}")
    if isinstance(constraints, str) or not isinstance(constraints, (list, tuple)) or \
            any(kind not in KINDS for kind in constraints):
        raise ValueError(f"constraints={constraints!r} must be a tuple of kinds, one per constraint, "
                         f"each one of {list(KINDS)}")
    kinds = tuple(constraints)
    options = dict(options or {})
    criteria = {"n_objectives": n_objectives, "kinds": kinds}
    if algo == "nomad":
        from orchestrator.search.searchers.nomad import make_nomad
        return make_nomad(space, budget=budget, parallel=parallel, seed=seed, options=options, **criteria)
    sampler = options.pop("sampler", "optuna" if n_objectives == 2 else "nni") if algo == "tpe" else None
    if sampler not in (None, "nni", "optuna") or (sampler == "nni" and n_objectives == 2):
        raise ValueError(f"tpe option sampler={sampler!r}; valid: 'nni' (the paper's, one objective) or 'optuna'")
    if algo == "tpe" and sampler == "optuna":
        from orchestrator.search.searchers.optuna_tpe import OptunaTpeSearcher
        return OptunaTpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options, **criteria)
    if algo == "tpe":
        from orchestrator.search.searchers.tpe import TpeSearcher
        return TpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options, kinds=kinds)
    from orchestrator.search.searchers.simple import DefaultSearcher, RandomSearcher
    if options:
        raise ValueError(f"options {sorted(options)} given to algo={algo!r}, which takes none; remove them")
    cls = RandomSearcher if algo == "random" else DefaultSearcher
    return cls(space, budget=budget, parallel=parallel, seed=seed, **criteria)
