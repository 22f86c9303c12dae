"""Searchers behind one ask/tell protocol: ``nomad`` (MADS), ``tpe`` (NNI), ``random``, ``default``.

The study loop owns the loop; a searcher only proposes and listens::

    searcher = make_searcher("nomad", paper_space(), budget=100, parallel=4, seed=0, options={})
    searcher.replay(history)                 # on resume, before any ask
    while not searcher.finished:
        s = searcher.ask()                   # whenever a slot is free (up to `parallel` pending)
        ...                                  # submit s.point; later, when its result arrives:
        searcher.tell(s.trial_id, loss)      # loss None = failed evaluation
    searcher.close()

``ask()`` returns None when it has nothing to propose *right now* (NOMAD waits for its block's
results, the budget is spoken for by pending trials) or ever again (then ``finished`` is True).
Every searcher counts replayed and told results against ``budget`` and never hands out more than
``budget`` suggestions in total. A non-finite value is told as a failure. Each algorithm lives in its
own module, imported only when built, so that ``PyNomad`` and ``nni`` stay behind one module each.

Try it: ``python bench/hpo_efficiency.py --seeds 2 --budgets 25`` runs them on a synthetic landscape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.space import SearchSpace

ALGOS = ("nomad", "tpe", "random", "default")


@dataclass(frozen=True)
class Suggestion:
    """A point to evaluate. ``encoded`` is the algorithm's own view of it, for logging."""
    trial_id: int
    point: dict
    encoded: Any = None


@dataclass(frozen=True)
class Observation:
    """A finished evaluation from a previous run, for ``replay``; value None = failed."""
    point: dict
    value: float | None
    trial_id: int | None = None


class Searcher(Protocol):
    name: str

    @property
    def finished(self) -> bool: ...
    def ask(self) -> Suggestion | None: ...
    def tell(self, trial_id: int, value: float | None) -> None: ...
    def replay(self, history: list[Observation]) -> None: ...
    def close(self) -> None: ...


def clean_value(value: Any) -> float | None:
    """The value a searcher stores: a finite float, or None for a failure (NaN/inf included)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Ledger:
    """Book-keeping shared by all searchers: trial ids, pending trials, seen points, budget."""
    space: SearchSpace
    budget: int
    next_id: int = 0
    used: int = 0                                   # replayed + told results
    pending: dict = field(default_factory=dict)     # trial_id -> Suggestion
    seen: set = field(default_factory=set)          # keys of pending, told and replayed points
    replayed: bool = False

    def can_issue(self) -> bool:
        return self.used + len(self.pending) < self.budget

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    def issue(self, point: dict, encoded: Any = None) -> Suggestion:
        suggestion = Suggestion(self.next_id, point, encoded)
        self.next_id += 1
        self.pending[suggestion.trial_id] = suggestion
        self.seen.add(self.space.key(point))
        return suggestion

    def settle(self, trial_id: int, value: Any) -> tuple[Suggestion, float | None]:
        """Close a pending trial; returns it and its cleaned value."""
        if trial_id not in self.pending:
            raise ValueError(f"tell(): trial {trial_id} is not pending (pending: {sorted(self.pending)})")
        self.used += 1
        return self.pending.pop(trial_id), clean_value(value)

    def replay(self, history: list[Observation]) -> list[tuple[dict, float | None]]:
        """Count a previous run's results; returns them as (point, cleaned value)."""
        if self.replayed or self.next_id or self.used:
            raise RuntimeError("replay() must be called once, before the first ask()")
        self.replayed = True
        out = []
        for obs in history:
            if not self.space.contains(obs.point):
                raise ValueError(f"replay(): point {obs.point!r} is outside the search space "
                                 "(or its fixed values differ); replay only this study's results")
            out.append((obs.point, clean_value(obs.value)))
            self.seen.add(self.space.key(obs.point))
            if obs.trial_id is not None:
                self.next_id = max(self.next_id, obs.trial_id + 1)
        self.used = len(out)
        self.next_id = max(self.next_id, len(out))  # new trial ids never collide with old ones
        return out


def make_searcher(algo: str, space: SearchSpace, *, budget: int, parallel: int, seed: int,
                  options: dict | None = None) -> Searcher:
    """Build the searcher named ``algo`` (one of ALGOS). ``options`` are the algorithm's own."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is unknown; valid: {list(ALGOS)}")
    for what, value in (("budget", budget), ("parallel", parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    options = dict(options or {})
    if algo == "nomad":
        from orchestrator.searchers.nomad import NomadSearcher
        return NomadSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options)
    if algo == "tpe":
        from orchestrator.searchers.tpe import TpeSearcher
        return TpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options)
    from orchestrator.searchers.simple import DefaultSearcher, RandomSearcher
    if options:
        raise ValueError(f"options {sorted(options)} given to algo={algo!r}, which takes none; remove them")
    cls = RandomSearcher if algo == "random" else DefaultSearcher
    return cls(space, budget=budget, parallel=parallel, seed=seed)
