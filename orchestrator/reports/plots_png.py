"""The study's figures as PNG (matplotlib, Agg, object API: no pyplot, no global backend); see orchestrator/reports/plots.py."""
from __future__ import annotations

from pathlib import Path

from orchestrator.reports.view import (BEST, FAILED, View, best_so_far, grid_shape, loss_range, normalized,
                                       pruned_value)

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
    lo, hi, top = loss_range(v)
    if v.ok:
        ax.scatter([v.x(t) for t in v.ok], [t.value for t in v.ok], s=22, alpha=0.6, label="evaluation")
        ax.step(*best_so_far(v), where="post", color=BEST, lw=2, label="best so far")
        best = v.best
        if best is not None:
            ax.scatter([v.x(best)], [best.value], marker="*", s=160, color=BEST, edgecolor="black", zorder=3,
                       label=f"best (trial {best.trial})")
    failed = [t for t in v.failed if t not in v.pruned]
    if failed:
        ax.scatter([v.x(t) for t in failed], [top] * len(failed), marker="x", s=40, color=FAILED,
                   label=f"failed ({len(failed)})")
    if v.infeasible:
        ax.scatter([v.x(t) for t in v.infeasible], [t.value for t in v.infeasible], s=60, facecolors="none",
                   edgecolors=FAILED, label=f"infeasible ({len(v.infeasible)})")
    if v.pruned:
        ax.scatter([v.x(t) for t in v.pruned], [min(pruned_value(t), top) for t in v.pruned], marker="v", s=34,
                   color="gray", label=f"pruned ({len(v.pruned)})")
    if v.default is not None:
        ax.axhline(v.default.value, ls="--", color="gray", lw=1, label=f"default (trial {v.default.trial})")
    _empty_note(ax, v)
    ax.set_ylim(lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo))
    ax.xaxis.set_major_locator(MaxNLocator(integer=v.by == "trial"))
    ax.set(xlabel=v.x_label, ylabel="validation loss", title=v.title)
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    if v.ok or v.failed:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.savefig(path)


def parallel_png(v: View, path: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator
    n = len(v.axes) + 1
    fig = _figure(max(6.0, 1.5 * n + 2), 4.8)
    ax = fig.add_subplot()
    lo, hi, _ = loss_range(v)
    cmap, norm = _cmap(), Normalize(lo, hi)
    for t in v.failed:
        ys = [normalized(a, a.at(t.point)) for a in v.axes] + [1.08]
        ax.plot(range(n), ys, color="gray", ls="--", lw=0.9, alpha=0.6)
    best = v.best
    for t in sorted(v.ok, key=lambda t: -t.value):  # the best drawn last, on top
        ys = [normalized(a, a.at(t.point)) for a in v.axes] + [(t.value - lo) / (hi - lo)]
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


def params_png(v: View, path: Path) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    rows, cols = grid_shape(len(v.axes))
    fig = _figure(3.0 * cols + 1.2, 2.8 * rows + 0.6)
    grid = fig.subplots(rows, cols, sharey=True, squeeze=False)
    lo, hi, top = loss_range(v)
    trials = [t.trial for t in v.ok + v.failed] or [0]
    norm = Normalize(min(trials), max(max(trials), min(trials) + 1))
    best = v.best
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


