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


# Items each benchmark scores, in its full form (what a held-out dev subset is drawn from): MMLU's test split,
# BBH's 27 subsets less their 3 demonstrations, DROP's validation questions with agreeing answers outside the
# demonstrations' passages (an upper bound: the filter is applied to the data), HumanEval's problems.
FULL_SIZES = {"mmlu": 14042, "bbh": 6430, "drop": 9536, "humaneval": 164}


def benchmark_size(name: str, data_dir: str | None = None) -> int:
    """How many items `name` scores: counted from local files (data_dir, prompts built without a tokenizer),
    else the full benchmark's size (the hub cannot be read from a login node without network)."""
    if data_dir is None:
        return FULL_SIZES[name]
    task = get_tasks([name])[0]
    return len(task.build(task.load(data_dir), lambda prompts: [0] * len(prompts)))


__all__ = ["NAMES", "EvalError", "Example", "Task", "get_tasks", "benchmark_size", "FULL_SIZES"]
