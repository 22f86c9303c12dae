"""Pruning decisions from learning curves: median stopping and asynchronous successive halving (torch-free,
no I/O, no state).

    pruner = make_pruner({"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3})   # None: off
    decision = pruner.decide(trial, curves)      # after each new record of `trial`; None = let it run
    if decision: journal(decision.to_dict()); cancel the job; tell the searcher told_value(algo, decision)

`curves` maps every trial of the study so far (finished, running, pruned, failed) to its intermediate
validation losses [(fraction of training done, val_loss), ...] in increasing fraction, as the trial job
reports them (metrics.jsonl records {"step", "fraction", "val_loss"}). A curve that has a value at fraction
1.0 is a *completed* trial: the loop appends (1.0, final val_loss) when a job finishes if the job did not
report there itself. A completed trial is never pruned; a failed or pruned trial's curve simply stops.

`decide` judges `trial` at its last record only, and is a pure function of `curves`: the same curves give
the same Decision, on any machine, after any restart. So the loop journals each Decision before it cancels
the job; after a crash, a trial with a journaled decision stays pruned (it is not asked again: never
resurrected, never pruned twice), and each running trial is asked at its last record, as it would have
been. (A running trial re-asked after a resume may see more competitors at its rung than before the crash,
as it would have at its next record.)

Study YAML (`pruner:` absent or null = off, the paper's profile):

    pruner: {kind: median, n_startup_trials: 5, warmup: 0.25}       # + interval, n_min_trials
    pruner: {kind: asha, min_fraction: 0.125, reduction_factor: 3}  # + min_early_stopping_rate, min_trials
    pruner: {kind: asha, rungs: [0.1, 0.3], reduction_factor: 3}   # explicit rungs instead of min_fraction
    pruner: {kind: asha, min_fraction: 0.125, margin: 0.02}         # only trials clearly worse than the cutoff

Semantics (Optuna's, on fractions instead of integer steps; tests/test_pruners.py checks both against
Optuna's own pruners on random curves):

- median (Optuna MedianPruner): no decision before `n_startup_trials` trials completed, nor before the
  record at `warmup` of training; with `interval`, only at the first record at or after warmup + k*interval.
  The trial's best value so far is compared with the median of the completed trials' values at the same
  fraction (at least `n_min_trials` of them); worse than the median is pruned. A curve without any finite
  value (diverged) is pruned.
- asha (asynchronous successive halving, Li et al. 2018, stopping variant as Optuna's
  SuccessiveHalvingPruner): rungs at min_fraction * reduction_factor ** (min_early_stopping_rate + k) below
  1.0. When a trial's record first reaches a rung, its value there is ranked with every other trial's value
  at that rung (a trial's value at a rung is its first record at or after it); it continues iff it is in the
  top max(1, n // reduction_factor) of those n. No trial waits for a promotion (a SLURM job cannot be
  paused for free), so the first trials at a rung continue only if they are the best so far there, as in
  Optuna; `min_trials` > 1 lets every trial continue until that many have reached the rung.
- margin (both, validation-loss units, default 0 = Optuna's rule): prune only a trial worse than the
  threshold (median, rung cutoff) by more than `margin`. A ranking alone prunes good trials that merely
  drew a worse validation subset or sit among better ones (once a search converges every trial is good);
  a margin of about twice the noise of one intermediate validation pass keeps those and still stops the
  visibly bad ones (a learning rate of 1e-6, dropout 1).

What the searcher is told for a pruned trial (told_value; the lead's loop applies it):

- tpe: the last intermediate value. NNI's own experiment manager does the same when asked to (an assessor
  kills the trial and, with includeIntermediateResults, its dispatcher sends the last intermediate result to
  the tuner as the final one; by default the tuner hears nothing). It is informative: a pruned point lands
  in TPE's "bad" density, so TPE samples less near it; a failure (trial_end False) teaches TPE nothing and
  it may propose the same region again. Measured (bench/gpu_hours.py --told, asha, 9 seeds): told the last
  value, TPE reached the unpruned study's best in 6/9 seeds within the same GPU-hours; told a failure, 2/9.
- nomad: a failure (None, NOMAD's extreme barrier). MADS only needs to know that the point is no
  improvement, which a failure says; a partial value would enter NOMAD's quadratic models as if it were a
  final loss (a loss at 1/8 of training is far above any final one) and bend them. Measured on the same
  curves (asha, 9 seeds): told a failure, NOMAD got within the noise of the unpruned best with a median
  54% fewer GPU-hours (9/9 seeds) and reached it exactly in 5/9; told the last value, 22% and 4/9. One
  exception: NOMAD stops for good when its
  starting point fails, so a pruned starting point is told its last value (`is_start`). In a fresh study
  NOMAD evaluates X0 alone before any other point, so neither pruner can prune it (no completed trial to
  compare with, alone at its rungs); it matters when the curves hold other trials (e.g. a warm start).
- random, default: the last intermediate value (they ignore values; the journal and MLflow keep it).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Mapping, Sequence

EPS = 1e-9  # fractions are compared with this tolerance (0.1 + 0.2 != 0.3)
Curve = Sequence[tuple[float, float]]


class PrunerError(ValueError):
    """A bad `pruner:` mapping; the message names the key, the bad value and the fix."""


@dataclass(frozen=True)
class Decision:
    """Prune `trial` now. `fraction`/`value`: its last record (where it stops; the value the searcher and the
    journal get); `compared`: the value that was judged (best so far for median, the rung value for asha);
    `threshold`: what it had to beat; `rung`: index of the rung (asha) or of the record (median)."""
    trial: int
    pruner: str
    rung: int
    fraction: float
    value: float
    compared: float
    threshold: float
    n_compared: int
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _completed(curve: Curve) -> bool:
    return bool(curve) and curve[-1][0] >= 1.0 - EPS


def _value_at(curve: Curve, fraction: float) -> float | None:
    """The trial's value at a rung: its first record at or after `fraction`."""
    return next((v for f, v in curve if f >= fraction - EPS), None)


def _exactly_at(curve: Curve, fraction: float) -> float | None:
    return next((v for f, v in curve if abs(f - fraction) <= EPS), None)


def _check_int(key: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PrunerError(f"pruner.{key}={value!r} must be an integer >= {low}")


def _check_fraction(key: str, value, low_open: bool, below_end: bool, what: str) -> None:
    """A fraction of training: >= 0 (> 0 if low_open), <= 1.0 (< 1.0 if below_end: 1.0 is the end)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PrunerError(f"pruner.{key}={value!r} must be a number (a fraction of training, e.g. 0.25)")
    if value > 1.0 + EPS or (below_end and value >= 1.0 - EPS):
        raise PrunerError(f"pruner.{key}={value!r} is {'at or ' if below_end else ''}beyond the end of training "
                          f"(1.0 = the whole training): {what}")
    if value < 0 or (low_open and value <= 0):
        raise PrunerError(f"pruner.{key}={value!r} must be {'>' if low_open else '>='} 0 (a fraction of training)")


def _check_margin(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise PrunerError(f"pruner.margin={value!r} must be a number >= 0 (validation-loss units, e.g. 0.02)")


@dataclass(frozen=True)
class MedianPruner:
    """Median stopping, Optuna MedianPruner's rule on fractions of training (see the module docstring)."""
    n_startup_trials: int = 5
    warmup: float = 0.0
    interval: float | None = None
    n_min_trials: int = 1
    margin: float = 0.0
    kind: str = field(default="median", init=False)

    def __post_init__(self):
        _check_margin(self.margin)
        _check_int("n_startup_trials", self.n_startup_trials, 0)
        _check_int("n_min_trials", self.n_min_trials, 1)
        _check_fraction("warmup", self.warmup, False, True, "a warmup that long never prunes; use e.g. 0.25")
        if self.interval is not None:
            _check_fraction("interval", self.interval, True, False, "use a shorter interval, or null for every report")

    def check_reports(self, fractions: Sequence[float]) -> None:
        """PrunerError unless the trials report at some fraction in [warmup, 1): else it never prunes."""
        if not any(self.warmup - EPS <= f < 1.0 - EPS for f in fractions):
            raise PrunerError(f"pruner.warmup={self.warmup} leaves no intermediate report before the end of "
                              f"training (reports at {sorted(fractions)}): lower warmup or report more often")

    def decide(self, trial: int, curves: Mapping[int, Curve]) -> Decision | None:
        curve = list(curves.get(trial) or ())
        if not curve or _completed(curve):
            return None
        done = [c for t, c in curves.items() if t != trial and _completed(c)]
        if not done or len(done) < self.n_startup_trials:
            return None
        step, last = curve[-1]
        if step < self.warmup - EPS or not self._check_now(step, curve):
            return None
        finite = [v for _, v in curve if not math.isnan(v)]
        if not finite:
            return Decision(trial, self.kind, len(curve) - 1, step, last, math.nan, math.nan, 0,
                            f"no finite validation loss up to {step:.3g} of training (diverged)")
        best = min(finite)
        at_step = [v for c in done if (v := _exactly_at(c, step)) is not None]
        values = [v for v in at_step if not math.isnan(v)]  # NaN count towards n_min_trials, as in Optuna
        if len(at_step) < self.n_min_trials or not values:
            return None
        median = _median(values)
        if not best > median + self.margin:
            return None
        by = f" + margin {self.margin:g}" if self.margin else ""
        return Decision(trial, self.kind, len(curve) - 1, step, last, best, median, len(values),
                        f"best validation loss {best:.4g} up to {step:.3g} of training is worse than the median "
                        f"{median:.4g}{by} of {len(values)} completed trials there")

    def _check_now(self, step: float, curve: list) -> bool:
        """Optuna's interval rule: judge at the first record at or after each warmup + k * interval."""
        if self.interval is None:
            return True
        lower = self.warmup + math.floor((step - self.warmup) / self.interval + EPS) * self.interval
        previous = max((f for f, _ in curve[:-1]), default=-1.0)
        return previous < lower - EPS


def _median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@dataclass(frozen=True)
class AshaPruner:
    """Asynchronous successive halving (stopping variant), Optuna SuccessiveHalvingPruner's rule on
    fractions of training (see the module docstring)."""
    min_fraction: float | None = None
    reduction_factor: int = 3
    min_early_stopping_rate: int = 0
    rungs: tuple | list | None = None
    min_trials: int = 1
    margin: float = 0.0
    kind: str = field(default="asha", init=False)

    def __post_init__(self):
        _check_margin(self.margin)
        _check_int("reduction_factor", self.reduction_factor, 2)
        _check_int("min_early_stopping_rate", self.min_early_stopping_rate, 0)
        _check_int("min_trials", self.min_trials, 1)
        if (self.rungs is None) == (self.min_fraction is None):
            raise PrunerError("pruner: asha needs either min_fraction (e.g. 0.125: rungs grow by reduction_factor "
                              "from there) or rungs (e.g. [0.1, 0.3]), not both")
        if self.rungs is not None:
            if not isinstance(self.rungs, (list, tuple)) or not self.rungs:
                raise PrunerError(f"pruner.rungs={self.rungs!r} must be a non-empty list of fractions, e.g. [0.1, 0.3]")
            for i, f in enumerate(self.rungs):
                _check_fraction(f"rungs[{i}]", f, True, True, "a rung there is never reached before the trial ends")
            if any(b <= a for a, b in zip(self.rungs, self.rungs[1:])):
                raise PrunerError(f"pruner.rungs={list(self.rungs)!r} must increase strictly, e.g. [0.1, 0.3]")
            object.__setattr__(self, "rungs", tuple(float(f) for f in self.rungs))
            if self.min_early_stopping_rate:
                raise PrunerError("pruner.min_early_stopping_rate applies to min_fraction, not to explicit rungs: "
                                  "drop it or list the rungs you want")
            return
        _check_fraction("min_fraction", self.min_fraction, True, True,
                        "the first rung must come before the end of training, e.g. 0.125")
        first = self.min_fraction * self.reduction_factor ** self.min_early_stopping_rate
        if first >= 1.0 - EPS:
            raise PrunerError(f"pruner: the first rung, min_fraction * reduction_factor ** min_early_stopping_rate = "
                              f"{first:.3g}, is at or beyond the end of training (1.0): lower min_fraction or "
                              "min_early_stopping_rate")
        fractions, f = [], first
        while f < 1.0 - EPS:
            fractions.append(f)
            f *= self.reduction_factor
        object.__setattr__(self, "rungs", tuple(fractions))

    def check_reports(self, fractions: Sequence[float]) -> None:
        """PrunerError unless every rung is reached by some report before the end of training."""
        for k, rung in enumerate(self.rungs):
            if not any(rung - EPS <= f < 1.0 - EPS for f in fractions):
                raise PrunerError(f"pruner: rung {k} at {rung:.3g} of training has no intermediate report at or after "
                                  f"it before the end (reports at {sorted(fractions)}): report more often or lower "
                                  "the rungs")

    def decide(self, trial: int, curves: Mapping[int, Curve]) -> Decision | None:
        curve = list(curves.get(trial) or ())
        if not curve or _completed(curve):
            return None
        step, value = curve[-1]
        previous = curve[-2][0] if len(curve) > 1 else -1.0
        for k, rung in enumerate(self.rungs):
            if rung > step + EPS:
                break
            if rung <= previous + EPS:
                continue  # judged at an earlier record
            if math.isnan(value):
                return Decision(trial, self.kind, k, step, value, value, math.nan, 0,
                                f"validation loss is NaN at {step:.3g} of training (diverged)")
            # a trial that diverged at the rung was pruned there and holds no place in it (as in Optuna)
            others = [v for t, c in curves.items()
                      if t != trial and (v := _value_at(c, rung)) is not None and not math.isnan(v)]
            n = len(others) + 1
            if n < self.min_trials:
                continue
            keep = max(1, n // self.reduction_factor)
            cutoff = sorted(others + [value])[keep - 1]
            if value > cutoff + self.margin:
                by = f" + margin {self.margin:g}" if self.margin else ""
                return Decision(trial, self.kind, k, step, value, value, cutoff, n,
                                f"validation loss {value:.4g} at rung {k} ({rung:.3g} of training) is not in the top "
                                f"{keep} of the {n} trials there (cutoff {cutoff:.4g}{by})")
        return None


PRUNERS = {"median": MedianPruner, "asha": AshaPruner}
OFF = ("none", "off")


def make_pruner(config: Mapping | None) -> MedianPruner | AshaPruner | None:
    """The pruner a study YAML's `pruner:` mapping describes; None (or kind none) = no pruning."""
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise PrunerError(f"pruner: must be a mapping such as {{kind: median}} or null (off), got {config!r}")
    options = dict(config)
    kind = options.pop("kind", None)
    if kind in OFF:
        if options:
            raise PrunerError(f"pruner: kind {kind} takes no options, got {sorted(options)}: remove them")
        return None
    if kind is None:
        raise PrunerError("pruner: needs a kind: median or asha (or pruner: null for no pruning)")
    if kind not in PRUNERS:
        raise PrunerError(f"pruner.kind={kind!r} is unknown; valid: {', '.join(PRUNERS)} (or null for no pruning)")
    cls = PRUNERS[kind]
    valid = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise PrunerError(f"pruner: {unknown} unknown for kind {kind}; valid: {', '.join(valid)}")
    return cls(**options)


def config(pruner) -> dict | None:
    """The `pruner:` mapping that rebuilds `pruner` (for the journal and MLflow); None when off."""
    if pruner is None:
        return None
    out = {"kind": pruner.kind}
    for f in fields(pruner):
        derived = f.name == "rungs" and getattr(pruner, "min_fraction", None) is not None
        if f.init and not derived and getattr(pruner, f.name) != f.default:
            value = getattr(pruner, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def describe(pruner) -> str:
    """One line for logs and tables, e.g. "asha(min_fraction=0.125, reduction_factor=3)"."""
    cfg = config(pruner)
    if cfg is None:
        return "none"
    return f"{cfg.pop('kind')}({', '.join(f'{k}={v}' for k, v in cfg.items())})"


# what each searcher is told for a pruned trial: the "last" intermediate value, or "fail" (None: NOMAD's
# extreme barrier, NNI's trial_end(success=False)); the reasons are in the module docstring
TOLD = {"nomad": "fail", "tpe": "last", "random": "last", "default": "last"}


def told_value(algo: str, decision: Decision, policy: str | None = None, is_start: bool = False) -> float | None:
    """The value to tell the searcher `algo` for a pruned trial: TOLD[algo] unless `policy` overrides it.
    `is_start`: the trial is the searcher's starting point (NOMAD's X0), told its last value even under
    "fail" (NOMAD gives up when X0 fails). A non-finite last value is always a failure (None)."""
    policy = policy or TOLD.get(algo, "last")
    if policy not in ("last", "fail"):
        raise ValueError(f"told policy {policy!r} is unknown; valid: last, fail")
    if policy == "fail" and not is_start:
        return None
    return decision.value if math.isfinite(decision.value) else None
