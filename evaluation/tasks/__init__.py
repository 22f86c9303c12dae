"""The benchmarks, one module each (prompt builder, scorer, averaging), declared as `Task` data."""
from __future__ import annotations

from evaluation.tasks import bbh, drop, humaneval, mmlu
from evaluation.tasks.common import EvalError, Example, Task

NAMES = ("mmlu", "bbh", "drop", "humaneval")


def get_tasks(names, humaneval_cut: str = "blank-line") -> list[Task]:
    """Tasks by name ("mmlu,bbh" or a list), in the order given; an unknown name lists the valid ones."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        raise EvalError(f"unknown task {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(NAMES)}")
    table = {"mmlu": mmlu.TASK, "bbh": bbh.TASK, "drop": drop.TASK, "humaneval": humaneval.make(humaneval_cut)}
    return [table[n] for n in dict.fromkeys(names)]


__all__ = ["NAMES", "EvalError", "Example", "Task", "get_tasks"]
