"""What a person watching the study sees: a status line when something changes, one line per finished trial,
and a final summary that says where everything is.

    [0:03:12] tiny-nomad: done 5/8 (1 failed) | slots 2/2 busy, 1 pending (Resources) | best 4.8371 (...) | ETA 0:02:40

The ETA uses the durations observed so far (submission to result, mean over finished trials): the running
trials' remaining time (mean minus elapsed, at least zero) plus the trials still to start, over the slots.
Pending jobs (SLURM has not started them) are counted as not started.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from jobs.contract import OK
from orchestrator.reports.text import fmt as _fmt, hms as _hms, point_text

PROGRESS_FILE = "progress.txt"


def _write_atomic(path: Path, text: str) -> None:
    try:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:  # a full disk must not stop the study for a status line
        pass


def eta_s(state, live, parallel: int, budget: int, now: float | None = None) -> float | None:
    """Seconds until the budget is spent, from the observed trial durations; None before the first result."""
    now = now or time.time()
    durations = [t.summary.get("total_s") for t in state.finished if isinstance(t.summary.get("total_s"), (int, float))]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    running = [lv for lv in live.values() if not lv.attempt.pending]
    left_running = sum(max(0.0, mean - (now - lv.started)) for lv in running)
    to_start = max(0, budget - len(state.finished) - len(running))
    return (left_running + to_start * mean) / max(1, parallel)


class Progress:
    def __init__(self, config, out):
        self.config, self.out, self.t0 = config, out, time.time()
        self.file = config.folder / PROGRESS_FILE  # `status` shows the last line (the outages it names too)
        self.names = list(config.space.names)
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.last_line, self.last_key = "", None

    def status_line(self, state, live, best, mlflow: str | None = None) -> tuple[str, tuple]:
        done = state.finished
        failed = sum(1 for t in done if t.status == "failed")
        pruned = sum(1 for t in done if t.status == "pruned")
        pending = [lv for lv in live.values() if lv.attempt.pending]
        reasons = sorted({lv.attempt.reason for lv in pending if lv.attempt.reason})
        slots = f"slots {len(live) - len(pending)}/{self.config.parallel} busy"
        if pending:
            slots += f", {len(pending)} pending" + (f" ({', '.join(reasons)})" if reasons else "")
        eta = eta_s(state, live, self.config.parallel, self.config.budget)
        best_text = f"best {best.value:.4f} ({point_text(best.point, self.names)})" if best else "best -"
        key = (len(done), failed, len(live), len(pending), tuple(reasons), best.trial if best else None, mlflow)
        line = (f"[{_hms(time.time() - self.t0)}] {self.config.study}: done {len(done)}/{self.config.budget} "
                f"({failed} failed{f', {pruned} pruned' if pruned else ''}) | {slots} | {best_text} | "
                f"ETA {_hms(eta) if eta is not None else '?'}")
        if mlflow:
            line += f" | {mlflow}"
        return line, key

    def update(self, state, live, best, mlflow: str | None = None) -> None:
        line, key = self.status_line(state, live, best, mlflow)
        if key != self.last_key:
            _write_atomic(self.file, line + "\n")
        if self.tty:
            self.out.write("\r" + line.ljust(len(self.last_line)))
            self.out.flush()
        elif key != self.last_key:  # a new line only when something changed, not because the clock did
            print(line, file=self.out, flush=True)
        self.last_line, self.last_key = line, key

    def _line(self, text: str) -> None:
        if self.tty and self.last_line:
            self.out.write("\n")
        print(text, file=self.out, flush=True)
        self.last_line = ""

    def event(self, t) -> None:
        result = f"val_loss {t.value:.4f}" if t.status == OK else f"{t.status.upper()}: {t.reason}"
        self._line(f"  trial {t.trial:3d} {point_text(t.point, self.names)}: {result}")

    def note(self, text: str) -> None:
        self._line(f"  {text}")

    def summary(self, state, best, default_point: dict, registered: dict | None, where: dict) -> None:
        done = sorted(state.finished, key=lambda t: t.trial)
        failed = sum(1 for t in done if t.status == "failed")
        default = next((t for t in done if t.status == OK and all(
            t.point.get(k) == v for k, v in default_point.items())), None)
        rows = [("best", best.point if best else None, best.value if best else None),
                ("default", default_point, default.value if default else None)]
        width = max(9, *(len(n) for n in self.names))
        lines = ["", f"study {self.config.study} ({self.config.algo}): {len(done)} evaluations, {failed} failed, "
                     f"{_hms(time.time() - self.t0)}",
                 f"{'':8s}" + "".join(f"{n:>{width}s}" for n in self.names) + f"{'val_loss':>{width}s}"]
        for label, point, value in rows:
            cells = "".join(f"{_fmt(point[n]) if point else '-':>{width}s}" for n in self.names)
            lines.append(f"{label:8s}{cells}{(f'{value:.4f}' if value is not None else 'not run'):>{width}s}")
        lines.append("")
        if registered:
            lines.append(f"champion:  {registered['uri']} (version {registered['version']}, trial "
                         f"{registered['trial']})")
        lines += [f"study:     {where['folder']} (journal, trial folders, logs)",
                  f"MLflow:    {where['tracking_uri']}", f"UI:        {where['ui']}",
                  f"plots:     {where['plots']}"]
        if failed == len(done) and done:
            lines.append("every evaluation failed: see the reasons above and the job logs under "
                         f"{where['folder']}/submitit")
        self._line("\n".join(lines))
