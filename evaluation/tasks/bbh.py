"""BIG-Bench Hard, 3-shot, as InstructEval runs it (27 subsets).

Per subset the first 3 rows are the demonstrations, each "{input}\\nAnswer: {target}\\n\\n", and every later
row is a question ending in "\\nAnswer:" (shots dropped while the prompt exceeds 2048 tokens). No sampling
arguments (the checkpoint's generation_config decides), 32 new tokens; correct if the stripped output starts
with the target; the score is the macro-average over subsets.
"""
from __future__ import annotations

from evaluation.data import load_hub, read_subsets, task_folder
from evaluation.tasks.common import EvalError, Example, Task, blank_line_after_answer, fit_shots, limited, \
    macro, score_starts_with

HUB_ID = "lukaemon/bbh"
SHOTS = 3
SUBSETS = (  # the 27 configurations of lukaemon/bbh (InstructEval lists them with get_dataset_config_names)
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting")


def format_row(row: dict, with_answer: bool) -> str:
    text = row["input"] + "\nAnswer:"
    return text + f" {row['target']}\n\n" if with_answer else text


def load(data_dir) -> dict:
    folder = task_folder(data_dir, "bbh")
    if folder is None:
        return {name: load_hub("bbh", HUB_ID, name, "test") for name in SUBSETS}
    return read_subsets(folder)


def build(raw: dict, count_tokens, limit=None, seed=0) -> list[Example]:
    items, meta = [], []
    for subset, rows in sorted(raw.items()):
        if len(rows) <= SHOTS:
            raise EvalError(f"bbh subset {subset} has {len(rows)} rows: needs more than {SHOTS} (the shots)")
        shots = [format_row(row, True) for row in rows[:SHOTS]]
        for i, row in enumerate(limited(rows[SHOTS:], limit)):
            items.append(("", shots, format_row(row, False)))
            meta.append((subset, i + SHOTS, row["target"]))
    return [Example(id=f"{subset}/{i}", group=subset, prompt=prompt, target=target, n_shots=k)
            for (prompt, k), (subset, i, target) in zip(fit_shots(items, count_tokens), meta)]


TASK = Task(name="bbh", source=HUB_ID, shots=SHOTS, max_new_tokens=32, load=load, build=build,
            score=score_starts_with, aggregate=macro, stop=blank_line_after_answer)
