"""The study's figures as self-contained interactive HTML (plotly); see orchestrator/reports/plots.py."""
from __future__ import annotations

from pathlib import Path

from orchestrator.reports.view import BEST, FAILED, View, best_so_far, grid_shape, loss_range, pruned_value

def _write_html(fig, path: Path) -> None:
    fig.update_layout(template="plotly_white", title=dict(font=dict(size=14)))
    fig.write_html(path, include_plotlyjs=True, full_html=True)  # self-contained: opens offline


def history_html(v: View, path: Path) -> None:
    import plotly.graph_objects as go
    fig = go.Figure()
    lo, hi, top = loss_range(v)
    if v.ok:
        fig.add_scatter(x=[v.x(t) for t in v.ok], y=[t.value for t in v.ok], mode="markers", name="evaluation",
                        hovertext=[v.hover(t) for t in v.ok], hoverinfo="text", marker=dict(opacity=0.7))
        xs, ys = best_so_far(v)
        fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(shape="hv", color=BEST, width=3), name="best so far")
    failed = [t for t in v.failed if t not in v.pruned]
    if failed:
        fig.add_scatter(x=[v.x(t) for t in failed], y=[top] * len(failed), mode="markers",
                        name=f"failed ({len(failed)})", hovertext=[v.hover(t) for t in failed],
                        hoverinfo="text", marker=dict(symbol="x", color=FAILED, size=9))
    if v.infeasible:
        fig.add_scatter(x=[v.x(t) for t in v.infeasible], y=[t.value for t in v.infeasible], mode="markers",
                        name=f"infeasible ({len(v.infeasible)})", hovertext=[v.hover(t) for t in v.infeasible],
                        hoverinfo="text", marker=dict(symbol="circle-open", color=FAILED, size=12))
    if v.pruned:
        fig.add_scatter(x=[v.x(t) for t in v.pruned], y=[min(pruned_value(t), top) for t in v.pruned],
                        mode="markers", name=f"pruned ({len(v.pruned)})", hovertext=[v.hover(t) for t in v.pruned],
                        hoverinfo="text", marker=dict(symbol="triangle-down", color="gray", size=9))
    if v.default is not None:
        fig.add_hline(y=v.default.value, line=dict(dash="dash", color="gray"),
                      annotation_text=f"default (trial {v.default.trial})")
    fig.update_layout(title=v.title, xaxis_title=v.x_label, yaxis_title="validation loss",
                      yaxis_range=[lo - 0.05 * (hi - lo), top + 0.05 * (hi - lo)])
    _write_html(fig, path)


def parallel_html(v: View, path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.colors import sample_colorscale
    lo, hi, top = loss_range(v)
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
    rows, cols = grid_shape(len(v.axes))
    fig = make_subplots(rows=rows, cols=cols, shared_yaxes=True, horizontal_spacing=0.04,
                        vertical_spacing=0.18)
    lo, hi, top = loss_range(v)
    trials = [t.trial for t in v.ok + v.failed] or [0]
    best = v.best
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


