"""Blackboxes for the study tests (importable by jobs as tests.objectives:NAME)."""
import json
import os
import time
from pathlib import Path

from orchestrator.objectives import paper_landscape


def _mark(point: dict) -> None:
    """Record every evaluation (one file per call) so tests can prove none ran twice."""
    folder = os.environ.get("LORA_HPO_TEST_MARKS")
    if folder:
        name = f"{time.time_ns()}-{os.getpid()}.json"
        Path(folder, name).write_text(json.dumps(point, sort_keys=True))


def landscape(point: dict) -> float:
    _mark(point)
    return paper_landscape(point)


def flaky(point: dict) -> dict:
    """Fails for dropout 1 (raises) and returns NaN for tiny ranks; otherwise a dict with the objective."""
    _mark(point)
    if point["dropout"] == 1:
        raise RuntimeError("adapter never trains with dropout 1")
    if point["r"] == 4:
        return {"objective": float("nan")}
    return {"objective": paper_landscape(point), "extra_metric": 1.5}


def slow_landscape(point: dict) -> float:
    _mark(point)
    time.sleep(float(os.environ.get("LORA_HPO_TEST_SLEEP", "1.0")))
    return paper_landscape(point)
