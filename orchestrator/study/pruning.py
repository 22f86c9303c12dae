"""The study loop's side of pruning (the decisions themselves are orchestrator/search/pruners.py's).

    pruning = Pruning(config, state)            # None-safe: pruning.active is False without a `pruner:`
    decision = pruning.observe(t, follower.partial)   # after new intermediate records of a running trial
    if decision: journal it, cancel the job; at settlement: record "pruned", tell pruning.told(t)

Every trial's curve (fraction of training, intermediate validation loss) is kept for the pruner, which compares
a trial with all others: finished ones get (1.0, final loss) appended, pruned and failed ones stop where they
stopped. After a restart the curves are read back from the trial folders (metrics.jsonl) and the decisions from
the journal, so a pruned trial stays pruned (never resurrected) and none is pruned twice.
"""
from __future__ import annotations

from pathlib import Path

from jobs.contract import METRICS_FILE, OK
from orchestrator.study.curves import Follower
from orchestrator.search.pruners import Decision, told_value


class Pruning:
    def __init__(self, config, state):
        self.pruner = config.pruner  # typed by the config (orchestrator/search/pruners.py)
        self.algo = config.algo
        self.x0 = config.space.key(config.space.default_point())
        self.space = config.space
        self.curves: dict[int, list[tuple[float, float]]] = {}
        if self.pruner is not None:
            for t in state.trials.values():
                if t.out:
                    follower = Follower(Path(t.out) / METRICS_FILE)
                    follower.poll()
                    self.curves[t.trial] = list(follower.partial)
                if t.status == OK and t.value is not None:
                    self.completed(t.trial, t.value)

    @property
    def active(self) -> bool:
        return self.pruner is not None

    def observe(self, t, partial: list[tuple[float, float]]) -> Decision | None:
        """The pruner's decision for a running trial whose curve is now `partial`; None: let it run."""
        if self.pruner is None or t.pruned or not partial:
            return None
        self.curves[t.trial] = list(partial)
        return self.pruner.decide(t.trial, self.curves)

    def completed(self, trial: int, value: float) -> None:
        curve = self.curves.setdefault(trial, [])
        if not curve or curve[-1][0] < 1.0:
            curve.append((1.0, float(value)))

    def told(self, t) -> float | None:
        """What the searcher hears of a pruned trial (orchestrator/search/pruners.py TOLD: NOMAD a failure, TPE the
        last intermediate value); NOMAD's starting point gets its value (a failed X0 stops NOMAD)."""
        decision = Decision(**t.pruned)
        return told_value(self.algo, decision, is_start=self.space.key(t.point) == self.x0)
