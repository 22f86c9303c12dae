"""DROP, 3-shot, as InstructEval runs it (validation split).

Only questions whose answer spans agree are kept (one distinct span after stripping). The demonstrations
are one seeded draw of 3 of those questions (Python's `random.Random(seed).sample`, seed 0 as in the
reference); the test set is every kept question whose passage is not a demonstration's. Each prompt is
"{passage} {question}\\nAnswer: {span}\\n\\n" per demonstration, then the question ending in "\\nAnswer:"
(shots dropped while over 2048 tokens). No sampling arguments, 8 new tokens; correct if the stripped output
starts with the span; micro-average.
"""
from __future__ import annotations

import random

from evaluation.data import load_hub, read_split, task_folder
from evaluation.tasks.common import EvalError, Example, Task, blank_line_after_answer, fit_shots, limited, \
    micro, score_starts_with

HUB_ID = "ucinlp/drop"  # the reference's "drop", renamed on the hub
SHOTS = 3


def answers(row: dict) -> list[str]:
    return [span.strip() for span in row["answers_spans"]["spans"]]


def agreeing(rows: list[dict]) -> list[dict]:
    """Questions whose answer spans are all the same string."""
    return [row for row in rows if len(set(answers(row))) == 1]


def split_demos(rows: list[dict], seed: int = 0, k: int = SHOTS) -> tuple[list[dict], list[dict]]:
    """(demonstrations, test): a seeded draw of k rows, and the rows that share no passage with them."""
    if len(rows) <= k:
        raise EvalError(f"drop: {len(rows)} questions with agreeing answers: needs more than {k}")
    demos = random.Random(seed).sample(rows, k=k)
    passages = {row["passage"] for row in demos}
    return demos, [row for row in rows if row["passage"] not in passages]


def format_row(row: dict, with_answer: bool) -> str:
    text = row["passage"].strip() + " " + row["question"].strip() + "\nAnswer:"
    return text + f" {answers(row)[0]}\n\n" if with_answer else text


def load(data_dir) -> list[dict]:
    folder = task_folder(data_dir, "drop")
    if folder is None:
        return load_hub("drop", HUB_ID, None, "validation")
    return read_split(folder, "validation")


def build(raw: list[dict], count_tokens, limit=None, seed=0) -> list[Example]:
    demos, test = split_demos(agreeing(raw), seed)
    test = limited(test, limit)
    shots = [format_row(row, True) for row in demos]
    fitted = fit_shots([("", shots, format_row(row, False)) for row in test], count_tokens)
    return [Example(id=str(row.get("query_id", i)), group="drop", prompt=prompt, target=answers(row)[0], n_shots=k,
                    extra={"unit": _passage_key(row)})  # questions on one passage go to one side of a dev split
            for i, (row, (prompt, k)) in enumerate(zip(test, fitted))]


def _passage_key(row: dict) -> str:
    import hashlib
    return str(row.get("section_id") or hashlib.sha256(row["passage"].strip().encode()).hexdigest()[:16])


TASK = Task(name="drop", source=HUB_ID, shots=SHOTS, max_new_tokens=8, load=load, build=build,
            score=score_starts_with, aggregate=micro, stop=blank_line_after_answer)
