"""Pictures of a study, drawn from its journal: PNG (matplotlib, Agg) and self-contained HTML (plotly).

    python -m orchestrator plots --study tiny-nomad            # writes runs/tiny-nomad/plots/*.png|html
    python -m orchestrator plots --study tiny-nomad --out /tmp/p

Four figures, each as NAME.png and NAME.html (drawn by plots_png.py and plots_html.py):

- ``history``: the best-so-far validation loss against the trial number, every evaluation as a point,
  failed evaluations as red crosses along the top, pruned ones as grey triangles at the intermediate loss they
  were stopped at, the default point's loss as a dashed line.
- ``history_time``: the same against the wall time since the study started (when each result came): what a
  parallel study buys is seen here.
- ``parallel``: parallel coordinates of every trial, one axis per searched hyperparameter (a choice of
  powers of two on log2, other choices ordinal, ``log`` ones on log10, ints linear; each axis spans the
  search space) and the validation loss, coloured by that loss; failed trials end at "failed".
- ``params``: each hyperparameter against the validation loss (small multiples), coloured by trial number.

The axes come from the study's search space (the config in the journal); a journal whose points do not
match it gets axes inferred from the numeric values of its points. Login-node code: no torch; matplotlib
and plotly are imported only when drawing, and matplotlib through its object API (no pyplot, no global
backend). ``draw_plots`` is what the study loop calls (the tracker logs the folder): a failure to draw is a
warning, never the end of a study. A study's state (orchestrator/study/journal.py StudyState) is read, never
imported: this module sits below the study in the layers (README, Layout).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from orchestrator.reports.view import View, view_of


# ------------------------------------------------------------------------------------------- entry points
def _draws() -> dict:
    """name -> (view transform, PNG drawer, HTML drawer); matplotlib and plotly imported only when drawing."""
    from orchestrator.reports import plots_html as H
    from orchestrator.reports import plots_png as P
    same = lambda v: v  # noqa: E731
    return {"history": (same, P.history_png, H.history_html),
            "history_time": (View.by_hours, P.history_png, H.history_html),
            "parallel": (same, P.parallel_png, H.parallel_html), "params": (same, P.params_png, H.params_html)}


def write_plots(state, folder: str | Path) -> list[Path]:
    """Write history, history_time, parallel and params as .png and .html into `folder`; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    v = view_of(state)
    paths = []
    for name, (view, png, html) in _draws().items():
        for ext, draw in (("png", png), ("html", html)):
            draw(view(v), folder / f"{name}.{ext}")
            paths.append(folder / f"{name}.{ext}")
    return paths


def draw_plots(state, folder: str | Path) -> list[Path]:
    """write_plots, or [] with a warning if anything failed (the plots are a view: never why a study stops)."""
    try:
        return write_plots(state, folder)
    except Exception as e:  # noqa: BLE001
        warnings.warn(f"study plots not drawn: {type(e).__name__}: {e}", stacklevel=2)
        return []
