"""Optuna's TPE (``TPESampler``) behind the ask/tell protocol: ``tpe`` with two objectives (MOTPE), or with one
when ``searcher_options: {sampler: optuna}`` asks for it.

NNI's TPE optimizes one number, so ``make_searcher("tpe", space, ..., n_objectives=2)`` builds this
searcher (same name, ``tpe``; ``profile`` says ``optuna`` for the study's logs). With one objective, NNI's TPE
(the paper's) stays the default; ``sampler: optuna`` picks this one instead: multivariate (the variables modelled
jointly), with a constant liar for the running trials at ``parallel`` > 1, and the constraint values read by its
constrained TPE where NNI's hears a penalty; bench/search_quality.py compares the two (``tpe``, ``tpe-optuna``). It is the only module
that imports optuna. Optuna is driven through its own ask/tell API on an in-memory study with
``directions=["minimize", "minimize"]``:

- ``ask``: ``study.ask(distributions)`` (choices as categorical, ints as ints, ``log`` reals as
  log-scaled floats); a proposal equal to a seen point is told FAIL and drawn again.
- ``tell``: the pair of values, ``Trial.set_constraint`` per constraint first (Optuna 5's API; the
  deprecated ``constraints_func`` reads the same values): Optuna's constrained TPE ranks infeasible
  trials after every feasible one, by their total violation. pb and eb are alike here (Optuna has no
  barrier). A failure is a FAIL trial (TPE never learns from it).
- ``warm_start`` and ``replay``: finished results go in as ``add_trial`` (COMPLETE with their values
  and constraints, or FAIL), warm ones first; trials running at the crash are ``enqueue_trial`` +
  ``ask``, so Optuna sees them RUNNING (the constant liar counts them) and ``tell`` settles them.
- Options: ``n_startup_trials`` (random start, Optuna's default 10), ``n_ei_candidates``,
  ``multivariate`` (default True: MOTPE models the variables jointly), ``constant_liar`` (default:
  True when ``parallel`` > 1). Deterministic given the seed and the same answers in the same order.

Built by ``make_searcher("tpe", space, budget=100, parallel=1, seed=0, n_objectives=2)``;
tested by ``python -m pytest tests/test_criteria_searchers.py -k tpe``.
"""
from __future__ import annotations

import warnings

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from orchestrator.search.searchers.base import Ledger, LedgerSearcher, Observation, Pending, Suggestion
from orchestrator.search.space import Category, Choice, Int, Log, SearchSpace

OPTIONS = ("n_startup_trials", "n_ei_candidates", "multivariate", "constant_liar")
_MAX_DRAWS = 50


def optuna_distributions(space: SearchSpace) -> dict:
    """Optuna's distributions of the searched dimensions (also used by bench/multi_criteria.py)."""
    out = {}
    for dim in space.dims:
        if isinstance(dim, Choice):
            out[dim.name] = CategoricalDistribution(list(dim.values))
        elif isinstance(dim, Category):   # Optuna takes scalars only: the values' labels (category.py)
            out[dim.name] = CategoricalDistribution(list(dim.labels))
        elif isinstance(dim, Int):
            out[dim.name] = IntDistribution(dim.low, dim.high)
        elif isinstance(dim, Log):
            out[dim.name] = FloatDistribution(dim.low, dim.high, log=True)
        else:
            raise ValueError(f"space dimension {dim!r} has no Optuna distribution")
    return out


def sampler_arguments(options: dict, parallel: int) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"tpe options {unknown} do not apply to two objectives (Optuna's TPE); valid: {list(OPTIONS)}")
    for name in ("n_startup_trials", "n_ei_candidates"):
        v = options.get(name, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "n_startup_trials" else 1):
            raise ValueError(f"tpe option {name}={v!r} must be a non-negative integer")
    for name in ("multivariate", "constant_liar"):
        if name in options and not isinstance(options[name], bool):
            raise ValueError(f"tpe option {name}={options[name]!r} must be true or false")
    return {"multivariate": True, "constant_liar": parallel > 1, **options}


class OptunaTpeSearcher(LedgerSearcher):
    name = "tpe"
    profile = "optuna"   # which library runs behind the name, for the study's logs

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict,
                 n_objectives: int = 2, kinds: tuple = ()):
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._space = space
        self._ledger = Ledger(space, budget, parallel, n_objectives, kinds)
        self._dists = optuna_distributions(space)
        with warnings.catch_warnings():   # multivariate is "experimental" in Optuna's words
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, **sampler_arguments(options, parallel))
        self._study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)
        self._running: dict[int, optuna.trial.Trial] = {}

    def ask(self) -> Suggestion | None:
        if not self._ledger.can_issue():
            return None
        for _ in range(_MAX_DRAWS):
            trial = self._ask()
            point = {**self._space.default_point(), **self._decode(trial.params)}
            if self._space.key(point) not in self._ledger.seen:
                suggestion = self._ledger.issue(point, encoded=dict(trial.params))
                self._running[suggestion.trial_id] = trial
                return suggestion
            self._study.tell(trial, state=TrialState.FAIL)   # a seen point: withdraw it, draw again
        raise RuntimeError(f"Optuna's TPE proposed only already-seen points in {_MAX_DRAWS} draws")

    def _ask(self) -> optuna.trial.Trial:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return self._study.ask(self._dists)

    def tell(self, trial_id: int, value, constraints=None) -> None:
        _, value, constraints = self._ledger.settle(trial_id, value, constraints)
        trial = self._running.pop(trial_id)
        if value is None:
            self._study.tell(trial, state=TrialState.FAIL)
            return
        for j, c in enumerate(constraints):
            trial.set_constraint(str(j), c)
        self._study.tell(trial, list(value) if isinstance(value, tuple) else value)

    def warm_start(self, observations: list[Observation]) -> None:
        self._add(self._ledger.warm(observations))

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        results, adopted = self._ledger.replay(history, pending, encode=self._params)
        self._add(results)
        for suggestion in adopted:   # Optuna sees them RUNNING, with their own parameters
            self._study.enqueue_trial(suggestion.encoded)
            self._running[suggestion.trial_id] = self._ask()
        return adopted

    def _params(self, point: dict) -> dict:
        return {dim.name: dim.to_tpe(point[dim.name]) if isinstance(dim, Category) else point[dim.name]
                for dim in self._space.dims}

    def _decode(self, params: dict) -> dict:
        return {dim.name: dim.canonical_label(params[dim.name]) if isinstance(dim, Category) else params[dim.name]
                for dim in self._space.dims}

    def _add(self, results: list) -> None:
        for point, value, constraints in results:
            if value is None:
                trial = create_trial(state=TrialState.FAIL, params=self._params(point), distributions=self._dists)
            else:
                values = list(value) if isinstance(value, tuple) else [value]
                trial = create_trial(values=values, params=self._params(point), distributions=self._dists,
                                     constraints={str(j): c for j, c in enumerate(constraints)} or None)
            self._study.add_trial(trial)
