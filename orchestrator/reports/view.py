"""What every study figure shows, extracted once from a study's state: the axes of the search space, the trials
that succeeded, failed, were pruned or are infeasible, the default point's trial. The PNG and HTML drawers
(plots_png.py, plots_html.py) draw a View; plots.py writes the files.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from jobs.contract import OK
from orchestrator.reports.text import point_text
from orchestrator.search.space import Category, Int, Log, SearchSpace, SpaceError, paper_space

FAILED = "#d62728"  # failures are red crosses everywhere
BEST = "#ff7f0e"


@dataclass(frozen=True)
class Axis:
    """How one hyperparameter is drawn: its position on a (transformed) axis, its span and labelled ticks."""
    name: str
    label: str
    pos: Callable[[float], float]
    lo: float
    hi: float
    ticks: tuple = ()  # ((position, text), ...); empty: let the plotting library choose
    categorical: bool = False  # positions of any values (strings, booleans, lists), not only numbers

    def at(self, point: dict) -> float:
        v = point.get(self.name)
        if not (_is_number(v) or (self.categorical and v is not None)):
            return math.nan
        try:
            return float(self.pos(v))
        except (ValueError, ArithmeticError):
            return math.nan


@dataclass
class View:
    """What every figure needs, extracted once from the study state."""
    title: str
    axes: list[Axis]
    ok: list  # finished with a finite value, in trial order
    failed: list     # not finished with a value: failures, and pruned trials (also in `pruned`)
    running: int
    default: object  # the trial at the search space's default point, or None
    started: float | None = None  # the study's start (journal), for the wall-time history
    pruned: list = field(default_factory=list)  # stopped by the pruner: drawn at their last intermediate loss
    infeasible: list = field(default_factory=list)  # finished, but violating a constraint: drawn hollow
    by: str = "trial"             # what the history's x axis is: "trial" or "hours" (since the start)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.axes]

    @property
    def best(self):
        """The best feasible successful trial."""
        feasible = [t for t in self.ok if t not in self.infeasible]
        return min(feasible, key=lambda t: t.value) if feasible else None

    def x(self, t) -> float:
        """Where a finished trial sits on the history's x axis."""
        if self.by == "hours":
            return ((t.finished_at or self.started or 0) - (self.started or 0)) / 3600
        return t.trial

    @property
    def x_label(self) -> str:
        return "hours since the study started" if self.by == "hours" else "trial"

    def by_hours(self) -> "View":
        from dataclasses import replace
        return replace(self, by="hours")

    def hover(self, t) -> str:
        usable = t.status == OK and _is_number(t.value)  # an "ok" without a finite value counts as failed
        what = f"val_loss {t.value:.4f}" if usable else \
            f"{(t.status or 'failed').upper()}: {(t.reason or t.status or '')[:120]}"
        return f"trial {t.trial}<br>{point_text(t.point, self.names)}<br>{what}"


# ------------------------------------------------------------------------------------------- axes
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> str:
    return f"{v:g}"


def _padded(lo: float, hi: float) -> tuple[float, float]:
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def _space_axis(dim) -> Axis:
    if isinstance(dim, Category):  # categories: their declared order, named by their labels
        ticks = tuple((float(i), text) for i, text in enumerate(dim.labels))
        return Axis(dim.name, dim.name, lambda v: float(dim.labels.index(dim.key(v))),
                    *_padded(0, len(dim.values) - 1), ticks, categorical=True)
    if isinstance(dim, Log):
        lo, hi = math.log10(dim.low), math.log10(dim.high)
        ticks = tuple((float(e), f"1e{e}") for e in range(math.ceil(lo - 1e-9), math.floor(hi + 1e-9) + 1))
        return Axis(dim.name, f"log10 {dim.name}", math.log10, lo, hi, ticks)
    if isinstance(dim, Int):
        return Axis(dim.name, dim.name, float, *_padded(dim.low, dim.high))
    values = dim.values
    if all(v > 0 and math.log2(v).is_integer() for v in values):  # ranks: log2 keeps them evenly spaced
        ticks = tuple((math.log2(v), _text(v)) for v in values)
        return Axis(dim.name, f"{dim.name} (log2)", math.log2, *_padded(ticks[0][0], ticks[-1][0]), ticks)
    ordinal = lambda v: float(dim.values.index(dim.canonical(v)))  # noqa: E731 (raises ValueError off-grid)
    ticks = tuple((float(i), _text(v)) for i, v in enumerate(values))
    return Axis(dim.name, f"{dim.name} (ordinal)", ordinal, *_padded(0, len(values) - 1), ticks)


def _inferred_axes(points: list[dict]) -> list[Axis]:
    """Axes for points that match no known space: every key numeric in all points; log10 if wide and > 0."""
    names = list(dict.fromkeys(k for p in points for k in p))
    axes = []
    for name in names:
        values = [p.get(name) for p in points]
        if not all(_is_number(v) for v in values):
            continue
        if min(values) > 0 and max(values) / min(values) >= 100:
            axes.append(Axis(name, f"log10 {name}", math.log10,
                             *_padded(math.log10(min(values)), math.log10(max(values)))))
        else:
            axes.append(Axis(name, name, float, *_padded(float(min(values)), float(max(values)))))
    return axes


def _space(state) -> SearchSpace | None:
    """The study's search space as configured (the paper's when the config has none); None if unreadable."""
    config = state.config or {}
    try:
        return SearchSpace.from_dict(config["space"]) if config.get("space") else paper_space()
    except SpaceError:
        return None


def axes_of(state) -> list[Axis]:
    points = [t.point for t in state.trials.values()]
    space = _space(state)
    if space is not None and all(set(space.names) <= set(p) for p in points):
        return [_space_axis(d) for d in space.dims]
    return _inferred_axes(points)


def view_of(state) -> View:
    trials = sorted(state.trials.values(), key=lambda t: t.trial)
    ok = [t for t in trials if t.status == OK and _is_number(t.value)]
    failed = [t for t in trials if t.status is not None and not (t.status == OK and _is_number(t.value))]
    space, default = _space(state), None
    if space is not None:
        key = space.key(space.default_point())
        default = next((t for t in ok if _safe_key(space, t.point) == key), None)
    config = state.config or {}
    done = len(ok) + len(failed)
    title = f"{config.get('study', 'study')} ({config.get('algo', '?')}): {done} evaluation{'s' * (done != 1)}"
    pruned = [t for t in failed if t.status == "pruned"]
    title += f", {len(failed) - len(pruned)} failed" + (f", {len(pruned)} pruned" if pruned else "") + \
        (f", {len(state.running)} running" if state.running else "")
    if ok:
        best = min((t for t in ok if t.summary.get("feasible") is not False), key=lambda t: t.value, default=ok[0])
        title += f"; best {best.value:.4f} (trial {best.trial})"
    infeasible = [t for t in ok if t.summary.get("feasible") is False]
    if infeasible:
        title += f", {len(infeasible)} infeasible"
    return View(title, axes_of(state), ok, failed, len(state.running), default, state.started_at, pruned=pruned,
                infeasible=infeasible)


def _safe_key(space: SearchSpace, point: dict) -> str | None:
    try:
        return space.key(point)
    except (KeyError, ValueError, TypeError):
        return None


def loss_range(v: View) -> tuple[float, float, float]:
    """(low, high, the height of the 'failed' row above them) of the validation-loss axis."""
    values = [t.value for t in v.ok]
    if not values:
        return 0.0, 1.0, 1.1
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = max(abs(hi) * 0.05, 0.05)
        lo, hi = lo - pad, hi + pad
    return lo, hi, hi + 0.1 * (hi - lo)


def pruned_value(t) -> float:
    """The intermediate validation loss a pruned trial was stopped at (nan if unknown)."""
    v = (t.pruned or {}).get("value", t.summary.get("pruned_val_loss"))
    return float(v) if _is_number(v) else math.nan


def normalized(a: Axis, value: float) -> float:
    return (value - a.lo) / (a.hi - a.lo)


def grid_shape(k: int) -> tuple[int, int]:
    cols = min(max(k, 1), 4)
    return math.ceil(max(k, 1) / cols), cols


def best_so_far(v: View) -> tuple[list[float], list[float]]:
    xs, ys, best = [], [], math.inf
    for t in sorted((t for t in v.ok if t not in v.infeasible), key=v.x):
        if t.value < best:
            best = t.value
            xs.append(v.x(t))
            ys.append(best)
    last = max(v.x(t) for t in v.ok + v.failed) if v.ok else None
    if xs and last is not None and last > xs[-1]:
        xs.append(last)
        ys.append(ys[-1])
    return xs, ys
