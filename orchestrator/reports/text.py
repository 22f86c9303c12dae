"""How values, durations and points are written wherever a person reads them (progress, status, tables, plots)."""
from __future__ import annotations


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if (abs(v) < 1e-2 or abs(v) >= 1e4) and v != 0 else f"{v:g}"
    return str(v)


def hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def point_text(point: dict, names) -> str:
    return " ".join(f"{k}={fmt(point[k])}" for k in names if k in point)
