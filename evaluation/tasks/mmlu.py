"""MMLU, 5-shot, as InstructEval runs it (57 subjects, 14,042 test questions).

Prompt per question: "The following are multiple choice questions (with answers) about {subject}.\\n\\n", then
the subject's first five dev questions, each as question / "A. ..." .. "D. ..." lines / "Answer: X" and a
blank line, then the test question ending in "Answer:". Shots are dropped from the end while the prompt
exceeds 2048 tokens. No sampling arguments, 2 new tokens; correct if the stripped output starts with the gold
letter; micro-average over all questions, with a per-subject breakdown. `{subject}` is InstructEval's
format_subject: each "_"-separated word preceded by a space, so the line reads "about  abstract algebra."
(two spaces), exactly as in the reference.

Cells. InstructEval reads each subject's CSV with `pd.read_csv(path, header=None)` and formats cells with
"{}".format(cell), so pandas' parsing reaches the prompt: "None", "NA", "N/A", "null", "" and the other
default NA strings become "nan" (pandas >= 2.0 counts "None" among them), and a column of numbers is parsed
as numbers: "2" stays "2" in an all-integer column but becomes "2.0" in a column that also holds a NA, "0.50"
becomes "0.5", "true" becomes "True". `mmlu_cells: pandas` (as_pandas_reads) reproduces that by running
pandas itself on each (split, subject) file as the reference's CSV would hold it; `text` (the default) keeps
the data set's strings: the reference's reading garbles answer choices, a defect.
"""
from __future__ import annotations

from evaluation.data import load_hub, read_split, task_folder
from evaluation.tasks.common import EvalError, Example, Task, blank_line_after_answer, fit_shots, limited, \
    micro, score_starts_with

CHOICES = "ABCD"
HUB_ID = "cais/mmlu"


def format_subject(subject: str) -> str:
    return "".join(" " + word for word in subject.split("_"))


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"


def format_question(row: dict, with_answer: bool) -> str:
    text = row["question"] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, row["choices"]))
    text += "\nAnswer:"
    return text + f" {gold(row)}\n\n" if with_answer else text


def gold(row: dict) -> str:
    answer = row["answer"]
    return CHOICES[answer] if isinstance(answer, int) else str(answer).strip()


def load(data_dir) -> dict:
    folder = task_folder(data_dir, "mmlu")
    if folder is None:
        return {split: load_hub("mmlu", HUB_ID, "all", split) for split in ("dev", "test")}
    return {split: read_split(folder, split) for split in ("dev", "test")}


def build(raw: dict, count_tokens, limit=None, seed=0) -> list[Example]:
    """Subjects in sorted order, test questions in file order (`limit`: the first N per subject)."""
    dev, test = _by_subject(raw["dev"]), _by_subject(raw["test"])
    missing = sorted(set(test) - set(dev))
    if missing:
        raise EvalError(f"mmlu: no dev questions (the shots) for subject {missing[0]!r}: check the dev split")
    items, meta = [], []
    for subject in sorted(test):
        shots = [format_question(row, True) for row in dev[subject][:5]]
        for i, row in enumerate(limited(test[subject], limit)):
            items.append((header(subject), shots, format_question(row, False)))
            meta.append((subject, i, gold(row)))
    return [Example(id=f"{subject}/{i}", group=subject, prompt=prompt, target=target, n_shots=k)
            for (prompt, k), (subject, i, target) in zip(fit_shots(items, count_tokens), meta)]


def as_pandas_reads(raw: dict) -> dict:
    """The MMLU rows with each question and choice as InstructEval's pd.read_csv + "{}".format gave it: every
    (split, subject) is one CSV file (question, A, B, C, D, answer; no header), parsed by pandas, column types
    inferred over the whole file as there. Rows keep their order and every other field."""
    import csv
    import io

    import pandas as pd

    out = {}
    for split, rows in raw.items():
        parsed = {}
        for subject, group in _by_subject(rows).items():
            text = io.StringIO()
            csv.writer(text).writerows([[r["question"], *r["choices"], gold(r)] for r in group])
            frame = pd.read_csv(io.StringIO(text.getvalue()), header=None)
            cells = [["{}".format(frame.iloc[i, j]) for j in range(frame.shape[1])] for i in range(len(group))]
            parsed.update({id(r): c for r, c in zip(group, cells)})
        out[split] = [{**r, "question": parsed[id(r)][0], "choices": parsed[id(r)][1:-1]} for r in rows]
    return out


def _by_subject(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["subject"], []).append(row)
    return out


TASK = Task(name="mmlu", source=HUB_ID, shots=5, max_new_tokens=2, load=load, build=build,
            score=score_starts_with, aggregate=micro, stop=blank_line_after_answer)
