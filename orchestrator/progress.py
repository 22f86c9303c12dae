"""What a person watching the study sees: a live status line, one line per finished trial, a final table."""
from __future__ import annotations

import time


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:g}"
    return str(v)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def point_text(point: dict, names) -> str:
    return " ".join(f"{k}={_fmt(point[k])}" for k in names if k in point)


class Progress:
    def __init__(self, config, out):
        self.config, self.out, self.t0 = config, out, time.time()
        self.names = list(config.search_space().names)
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.last_line, self.last_print = "", 0.0

    def status_line(self, state, live, best) -> str:
        done = state.finished
        failed = sum(1 for t in done if t.status == "failed")
        elapsed = time.time() - self.t0
        durations = [t.summary.get("total_s") for t in done if isinstance(t.summary.get("total_s"), (int, float))]
        left = self.config.budget - len(done)
        eta = (sum(durations) / len(durations)) * left / self.config.parallel if durations and left else 0
        best_text = f"best {best.value:.4f} ({point_text(best.point, self.names)})" if best else "best -"
        return (f"[{_hms(elapsed)}] {self.config.study}: done {len(done)}/{self.config.budget} "
                f"({failed} failed), running {len(live)} | {best_text} | ETA {_hms(eta) if durations else '?'}")

    def update(self, state, live, best) -> None:
        line = self.status_line(state, live, best)
        if self.tty:
            self.out.write("\r" + line.ljust(len(self.last_line)))
            self.out.flush()
        elif line.split("]", 1)[1] != self.last_line.split("]", 1)[-1] or time.time() - self.last_print > 60:
            print(line, file=self.out, flush=True)
            self.last_print = time.time()
        self.last_line = line

    def event(self, t) -> None:
        if self.tty:
            self.out.write("\n")
        result = f"val_loss {t.value:.4f}" if t.status == "ok" else f"FAILED: {t.reason}"
        print(f"  trial {t.trial:3d} {point_text(t.point, self.names)}: {result}", file=self.out, flush=True)
        self.last_line = ""

    def summary(self, state, best, default_point: dict, registered: dict | None) -> None:
        done = sorted(state.finished, key=lambda t: t.trial)
        failed = sum(1 for t in done if t.status == "failed")
        default = next((t for t in done if t.status == "ok" and all(
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
        if registered:
            lines.append(f"registered: {registered['name']} v{registered['version']} ({registered['uri']})")
        print("\n".join(lines), file=self.out, flush=True)
