"""Pictures of a study, drawn from its journal: PNG (matplotlib, Agg) and self-contained HTML (plotly).

    python -m orchestrator.plots runs/tiny-nomad              # writes runs/tiny-nomad/plots/*.png|html
    python -m orchestrator.plots runs/tiny-nomad --out /tmp/p

Three figures, each as NAME.png and NAME.html:

- ``history``: the best-so-far validation loss against the trial number, every evaluation as a point,
  failed evaluations as red crosses along the top, the default point's loss as a dashed line.
- ``parallel``: parallel coordinates of every trial, one axis per searched hyperparameter (a choice of
  powers of two on log2, other choices ordinal, ``log`` ones on log10, ints linear; each axis spans the
  search space) and the validation loss, coloured by that loss; failed trials end at "failed".
- ``params``: each hyperparameter against the validation loss (small multiples), coloured by trial number.

The axes come from the study's search space (the config in the journal); a journal whose points do not
match it gets axes inferred from the numeric values of its points. Login-node code: no torch; matplotlib
and plotly are imported only when drawing, and matplotlib through its object API (no pyplot, no global
backend). ``log_plots`` is what the study loop calls: a failure to draw or log is a warning, never the end
of a study.
"""
from __future__ import annotations

import argparse
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from orchestrator.journal import Journal, StudyState, TrialState
from orchestrator.progress import point_text
from orchestrator.space import Int, Log, SearchSpace, SpaceError, paper_space

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

    def at(self, point: dict) -> float:
        v = point.get(self.name)
        if not _is_number(v):
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
    ok: list[TrialState]  # finished with a finite value, in trial order
    failed: list[TrialState]
    running: int
    default: TrialState | None

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.axes]

    def hover(self, t: TrialState) -> str:
        usable = t.status == "ok" and _is_number(t.value)  # an "ok" without a finite value counts as failed
        what = f"val_loss {t.value:.4f}" if usable else f"FAILED: {(t.reason or t.status or '')[:120]}"
        return f"trial {t.trial}<br>{point_text(t.point, self.names)}<br>{what}"


# ------------------------------------------------------------------------------------------- axes
def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text(v) -> str:
    return f"{v:g}"


def _padded(lo: float, hi: float) -> tuple[float, float]:
    return (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)


def _space_axis(dim) -> Axis:
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


def _space(state: StudyState) -> SearchSpace | None:
    """The study's search space as configured (the paper's when the config has none); None if unreadable."""
    config = state.config or {}
    try:
        return SearchSpace.from_dict(config["space"]) if config.get("space") else paper_space()
    except SpaceError:
        return None


def axes_of(state: StudyState) -> list[Axis]:
    points = [t.point for t in state.trials.values()]
    space = _space(state)
    if space is not None and all(set(space.names) <= set(p) for p in points):
        return [_space_axis(d) for d in space.dims]
    return _inferred_axes(points)


def view_of(state: StudyState) -> View:
    trials = sorted(state.trials.values(), key=lambda t: t.trial)
    ok = [t for t in trials if t.status == "ok" and _is_number(t.value)]
    failed = [t for t in trials if t.status is not None and not (t.status == "ok" and _is_number(t.value))]
    space, default = _space(state), None
    if space is not None:
        key = space.key(space.default_point())
        default = next((t for t in ok if _safe_key(space, t.point) == key), None)
    config = state.config or {}
    done = len(ok) + len(failed)
    title = f"{config.get('study', 'study')} ({config.get('algo', '?')}): {done} evaluation{'s' * (done != 1)}"
    title += f", {len(failed)} failed" + (f", {len(state.running)} running" if state.running else "")
    if ok:
        best = min(ok, key=lambda t: t.value)
        title += f"; best {best.value:.4f} (trial {best.trial})"
    return View(title, axes_of(state), ok, failed, len(state.running), default)


def _safe_key(space: SearchSpace, point: dict) -> str | None:
    try:
        return space.key(point)
    except (KeyError, ValueError, TypeError):
        return None


def _loss_range(v: View) -> tuple[float, float, float]:
    """(low, high, the height of the 'failed' row above them) of the validation-loss axis."""
    values = [t.value for t in v.ok]
    if not values:
        return 0.0, 1.0, 1.1
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = max(abs(hi) * 0.05, 0.05)
        lo, hi = lo - pad, hi + pad
    return lo, hi, hi + 0.1 * (hi - lo)


def _best_so_far(v: View) -> tuple[list[int], list[float]]:
    xs, ys, best = [], [], math.inf
    for t in v.ok:
        if t.value < best:
            best = t.value
            xs.append(t.trial)
            ys.append(best)
    last = max(t.trial for t in v.ok + v.failed) if v.ok else None
    if xs and last is not None and last > xs[-1]:
        xs.append(last)
        ys.append(ys[-1])
    return xs, ys


# ------------------------------------------------------------------------------------------- PNG
def _figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _cmap():
    import matplotlib
    from matplotlib.colors import ListedColormap
    # viridis without its palest yellows, which vanish on white; dark = low loss = good
    return ListedColormap(matplotlib.colormaps["viridis"](_linspace(0.0, 0.88, 256)))


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _empty_note(ax, v: View) -> None:
    """Without a successful evaluation the loss axis has no scale: say so instead of showing one."""
    if not v.ok:
        ax.text(0.5, 0.5, f"no {'successful' if v.failed else 'finished'} evaluation yet", transform=ax.transAxes,
                ha="center", va="center", color="gray")
        ax.set_yticks([])


def history_png(v: View, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    lo, hi, top = _loss_range(v)
    if v.ok:
        ax.scatter([t.trial for t in v.ok], [t.value for t in v.ok], s=22, alpha=0.6, label="evaluation")
        ax.step(*_best_so_far(v), where="post", color=BEST, lw=2, label="best so far")
        best = min(v.ok, key=lambda t: t.value)
        ax.scatter([best.trial], [best.value], marker="*", s=160, color=BEST, edgecolor="black", zorder=3,
                   label=f"best (trial {best.trial})")
    if v.failed:
        ax.scatter([t.trial for t in v.failed], [top] * len(v.failed), marker="x", s=40, color=FAILED,
                   label=f"failed ({len(v.failed)})")
    if v.default is not None:
        ax.axhline(v.default.value, ls="--", color="gray", lw=1, label=f"default (trial {v.default.trial})")
    _empty_note(ax, v)
    ax.set_ylim(lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel="validation loss", title=v.title)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    if v.ok or v.failed:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.savefig(path)


def _normalized(a: Axis, value: float) -> float:
    return (value - a.lo) / (a.hi - a.lo)


def parallel_png(v: View, path: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator
    n = len(v.axes) + 1
    fig = _figure(max(6.0, 1.5 * n + 2), 4.8)
    ax = fig.add_subplot()
    lo, hi, _ = _loss_range(v)
    cmap, norm = _cmap(), Normalize(lo, hi)
    for t in v.failed:
        ys = [_normalized(a, a.at(t.point)) for a in v.axes] + [1.08]
        ax.plot(range(n), ys, color="gray", ls="--", lw=0.9, alpha=0.6)
    best = min(v.ok, key=lambda t: t.value) if v.ok else None
    for t in sorted(v.ok, key=lambda t: -t.value):  # the best drawn last, on top
        ys = [_normalized(a, a.at(t.point)) for a in v.axes] + [(t.value - lo) / (hi - lo)]
        ax.plot(range(n), ys, color=cmap(norm(t.value)), lw=2.8 if t is best else 1.2, alpha=0.85)
    for i, a in enumerate(v.axes + [None]):
        ax.axvline(i, color="black", lw=0.8)
        span = (a.lo, a.hi) if a else (lo, hi)
        ticks = (a.ticks if a and a.ticks else [] if not (a or v.ok) else
                 [(x, f"{x:.4g}") for x in MaxNLocator(5).tick_values(*span) if span[0] <= x <= span[1]])
        for x, text in ticks:
            ax.text(i - 0.04, (x - span[0]) / (span[1] - span[0]), text, ha="right", va="center", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="none", alpha=0.75, pad=0.6))
    if v.failed:
        ax.text(n - 1 - 0.04, 1.08, f"failed ({len(v.failed)})", ha="right", va="center", fontsize=7,
                color=FAILED)
    _empty_note(ax, v)
    ax.set_xticks(range(n), [a.label for a in v.axes] + ["val_loss"])
    ax.set_yticks([])
    ax.set_xlim(-0.5, n - 0.8)
    ax.set_ylim(-0.05, 1.13)
    for side in ("left", "right", "top", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title(v.title, fontsize=10)
    if v.ok:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="validation loss", shrink=0.8)
    fig.savefig(path)


def _grid(k: int) -> tuple[int, int]:
    cols = min(max(k, 1), 4)
    return math.ceil(max(k, 1) / cols), cols


def params_png(v: View, path: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    rows, cols = _grid(len(v.axes))
    fig = _figure(3.0 * cols + 1.2, 2.8 * rows + 0.6)
    grid = fig.subplots(rows, cols, sharey=True, squeeze=False)
    lo, hi, top = _loss_range(v)
    trials = [t.trial for t in v.ok + v.failed] or [0]
    norm = Normalize(min(trials), max(max(trials), min(trials) + 1))
    best = min(v.ok, key=lambda t: t.value) if v.ok else None
    if not v.axes:
        grid[0][0].text(0.5, 0.65, "no numeric hyperparameter", transform=grid[0][0].transAxes, ha="center",
                        color="gray")
    for ax in list(grid.flat)[max(len(v.axes), 1):]:
        ax.set_visible(False)
    for i, (a, ax) in enumerate(zip(v.axes, grid.flat)):
        ax.scatter([a.at(t.point) for t in v.ok], [t.value for t in v.ok], c=[t.trial for t in v.ok],
                   cmap="viridis", norm=norm, s=24, alpha=0.8)
        if best is not None:
            ax.scatter([a.at(best.point)], [best.value], marker="*", s=160, color=BEST, edgecolor="black")
        ax.scatter([a.at(t.point) for t in v.failed], [top] * len(v.failed), marker="x", color=FAILED, s=30)
        pad = 0.05 * (a.hi - a.lo)
        ax.set_xlim(a.lo - pad, a.hi + pad)
        if a.ticks:
            ax.set_xticks([x for x, _ in a.ticks], [s for _, s in a.ticks],
                          rotation=45 if len(a.ticks) > 5 else 0, fontsize=7)
        ax.set_xlabel(a.label)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("validation loss")
    _empty_note(grid[0][0], v)
    grid[0][0].set_ylim(lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo))
    fig.suptitle(v.title + ("; x = failed (top)" if v.failed else ""), fontsize=10)
    fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=grid, label="trial", shrink=0.8)
    fig.savefig(path)


# ------------------------------------------------------------------------------------------- HTML
def _write_html(fig, path: Path) -> None:
    fig.update_layout(template="plotly_white", title=dict(font=dict(size=14)))
    fig.write_html(path, include_plotlyjs=True, full_html=True)  # self-contained: opens offline


def history_html(v: View, path: Path) -> None:
    import plotly.graph_objects as go
    fig = go.Figure()
    lo, hi, top = _loss_range(v)
    if v.ok:
        fig.add_scatter(x=[t.trial for t in v.ok], y=[t.value for t in v.ok], mode="markers", name="evaluation",
                        hovertext=[v.hover(t) for t in v.ok], hoverinfo="text", marker=dict(opacity=0.7))
        xs, ys = _best_so_far(v)
        fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(shape="hv", color=BEST, width=3), name="best so far")
    if v.failed:
        fig.add_scatter(x=[t.trial for t in v.failed], y=[top] * len(v.failed), mode="markers",
                        name=f"failed ({len(v.failed)})", hovertext=[v.hover(t) for t in v.failed],
                        hoverinfo="text", marker=dict(symbol="x", color=FAILED, size=9))
    if v.default is not None:
        fig.add_hline(y=v.default.value, line=dict(dash="dash", color="gray"),
                      annotation_text=f"default (trial {v.default.trial})")
    fig.update_layout(title=v.title, xaxis_title="trial", yaxis_title="validation loss",
                      yaxis_range=[lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo)])
    _write_html(fig, path)


def parallel_html(v: View, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale
    lo, hi, top = _loss_range(v)
    trials = v.ok + v.failed
    dims = []
    for a in v.axes:
        dim = dict(label=a.label, values=[a.at(t.point) for t in trials], range=[a.lo, a.hi])
        if a.ticks:
            dim.update(tickvals=[x for x, _ in a.ticks], ticktext=[s for _, s in a.ticks])
        dims.append(dim)
    # failed trials sit on a 'failed' tick above the losses, in gray (the last tenth of the colour scale)
    ticks = [lo + (hi - lo) * i / 4 for i in range(5)] if v.ok else []
    dims.append(dict(label="val_loss", values=[t.value for t in v.ok] + [top] * len(v.failed),
                     range=[lo, top], tickvals=ticks + ([top] if v.failed else []),
                     ticktext=[f"{x:.4g}" for x in ticks] + (["failed"] if v.failed else [])))
    colors = [0.9 * (t.value - lo) / (hi - lo) for t in v.ok] + [1.0] * len(v.failed)
    stops = [i / 20 for i in range(19)]  # 0 .. 0.9
    scale = [[s, c] for s, c in zip(stops, sample_colorscale("Viridis", [s / 0.9 * 0.88 for s in stops]))]
    scale += [[0.901, "lightgray"], [1.0, "lightgray"]]
    fig = go.Figure(go.Parcoords(dimensions=dims, line=dict(color=colors, colorscale=scale, cmin=0, cmax=1)))
    fig.update_layout(title=v.title, margin=dict(l=70, r=70, t=110, b=40))
    _write_html(fig, path)


def params_html(v: View, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots
    rows, cols = _grid(len(v.axes))
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes=True, horizontal_spacing=0.04,
                        vertical_spacing=0.18)
    lo, hi, top = _loss_range(v)
    trials = [t.trial for t in v.ok + v.failed] or [0]
    best = min(v.ok, key=lambda t: t.value) if v.ok else None
    for i, a in enumerate(v.axes):
        row, col = i // cols + 1, i % cols + 1
        fig.add_trace(go.Scatter(
            x=[a.at(t.point) for t in v.ok], y=[t.value for t in v.ok], mode="markers", showlegend=False,
            hovertext=[v.hover(t) for t in v.ok], hoverinfo="text",
            marker=dict(color=[t.trial for t in v.ok], colorscale="Viridis", cmin=min(trials), cmax=max(trials),
                        showscale=i == 0, colorbar=dict(title="trial"), size=8)), row=row, col=col)
        if best is not None:
            fig.add_trace(go.Scatter(x=[a.at(best.point)], y=[best.value], mode="markers", showlegend=False,
                                     hovertext=[v.hover(best)], hoverinfo="text",
                                     marker=dict(symbol="star", size=16, color=BEST, line=dict(width=1))),
                          row=row, col=col)
        if v.failed:
            fig.add_trace(go.Scatter(
                x=[a.at(t.point) for t in v.failed], y=[top] * len(v.failed), mode="markers", showlegend=False,
                hovertext=[v.hover(t) for t in v.failed], hoverinfo="text",
                marker=dict(symbol="x", color=FAILED, size=9)), row=row, col=col)
        pad = 0.05 * (a.hi - a.lo)
        axis = dict(title_text=a.label, range=[a.lo - pad, a.hi + pad])
        if a.ticks:
            axis.update(tickvals=[x for x, _ in a.ticks], ticktext=[s for _, s in a.ticks])
        fig.update_xaxes(row=row, col=col, **axis)
    fig.update_yaxes(range=[lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo)])
    fig.update_yaxes(title_text="validation loss", col=1)
    fig.update_layout(title=v.title + ("; x = failed (top)" if v.failed else ""), height=330 * rows + 80)
    _write_html(fig, path)


# ------------------------------------------------------------------------------------------- entry points
DRAW = {"history": (history_png, history_html), "parallel": (parallel_png, parallel_html),
        "params": (params_png, params_html)}


def write_plots(state: StudyState, folder: str | Path) -> list[Path]:
    """Write history, parallel and params as .png and .html into `folder`; returns the six paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    v = view_of(state)
    paths = []
    for name, draws in DRAW.items():
        for ext, draw in zip(("png", "html"), draws):
            draw(v, folder / f"{name}.{ext}")
            paths.append(folder / f"{name}.{ext}")
    return paths


def draw_plots(state: StudyState, folder: str | Path) -> list[Path]:
    """write_plots, or [] with a warning if anything failed (the plots are a view: never why a study stops)."""
    try:
        return write_plots(state, folder)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"study plots not drawn: {type(e).__name__}: {e}", stacklevel=2)
        return []


def log_plots(client, run_id: str, state: StudyState, tmpdir: str | Path) -> list[str]:
    """Draw the plots into `tmpdir`/plots and log them as artifacts `plots/*` of `run_id` (the study's parent
    run, overwriting the previous ones). Returns the artifact paths; [] with a warning if anything failed."""
    try:
        paths = write_plots(state, Path(tmpdir) / "plots")
        client.log_artifacts(run_id, str(Path(tmpdir) / "plots"), "plots")
    except Exception as e:  # the plots are a view of the study: never the reason it stops
        warnings.warn(f"study plots not logged to run {run_id}: {type(e).__name__}: {e}", stacklevel=2)
        return []
    return [f"plots/{p.name}" for p in paths]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator.plots", description="Draw a study's plots.")
    p.add_argument("folder", help="the study's folder (holds journal.jsonl), e.g. runs/tiny-nomad")
    p.add_argument("--out", help="where to write them (default: FOLDER/plots)")
    args = p.parse_args(argv)
    journal = Journal(Path(args.folder) / "journal.jsonl")
    if not journal.exists():
        p.error(f"no journal.jsonl in {args.folder}: give a study folder such as runs/tiny-nomad")
    for path in write_plots(journal.load(), args.out or Path(args.folder) / "plots"):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
