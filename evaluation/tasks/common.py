"""What every task shares: the example record, the task declaration, shot fitting, starts-with scoring, averages.

A task is data (`Task`): how to load its rows, build its prompts, when generation may stop, how an output is
post-processed and scored, and how scores are averaged. `evaluation/runner.py` is the one loop over them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

MAX_INPUT_TOKENS = 2048  # InstructEval's max_input_length for MMLU, BBH and DROP (shots dropped beyond it)


class EvalError(ValueError):
    """Bad input to the evaluator (data, adapter, task names); the message names the thing and the fix."""


@dataclass
class Example:
    id: str  # unique within its task: subject/row, subset/row, query_id, task_id
    group: str  # MMLU subject, BBH subset; DROP and HumanEval have one group
    prompt: str
    target: str  # the gold answer (HumanEval: the entry point)
    n_shots: int = 0  # demonstrations kept after dropping shots at the token limit
    extra: dict = field(default_factory=dict)  # task-specific (HumanEval: raw prompt, test, entry point)

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Task:
    """One benchmark as InstructEval runs it. `build` turns loaded rows into examples, `score` outputs into
    records (dicts with at least `correct`), `aggregate` records into {"score": ..., ...}."""

    name: str
    source: str  # hub id of the real data set (documentation and error messages)
    shots: int
    max_new_tokens: int
    load: Callable[[Optional[Path]], object]  # data_dir (None: the hub) -> raw rows in the source's schema
    build: Callable[..., list]  # (raw, count_tokens, limit, seed) -> list[Example]
    score: Callable[..., list]  # (examples, outputs, **options) -> list[dict]
    aggregate: Callable[[list], dict]
    stop: Optional[Callable[[str], bool]] = None  # generated text -> True when later tokens cannot matter
    postprocess: Callable[[str], str] = lambda text: text
    # The temperature InstructEval passes to generate() with do_sample=True (HumanEval: 0.1); 0: it passes no
    # sampling argument and the checkpoint's generation_config decides (decoding: reference).
    temperature: float = 0.0


# ----------------------------------------------------------------------------------------------- prompts
def fit_shots(items: list[tuple[str, list[str], str]], count_tokens, max_tokens: int = MAX_INPUT_TOKENS):
    """(prompt, k) for each (head, shots, end): head + first k shots + end, k lowered from len(shots) while the
    prompt has more than max_tokens tokens (BOS included), down to 0 - InstructEval's loop. Lengths are
    counted in one batch first; only prompts that are too long are re-counted shot by shot."""
    full = [head + "".join(shots) + end for head, shots, end in items]
    out = []
    for (head, shots, end), prompt, n in zip(items, full, count_tokens(full)):
        k = len(shots)
        while n > max_tokens and k > 0:
            k -= 1
            prompt = head + "".join(shots[:k]) + end
            n = count_tokens([prompt])[0]
        out.append((prompt, k))
    return out


def split_dev(examples: list, dev_size: int, seed: int, task: str) -> tuple[list, list]:
    """(dev, test): a seeded draw of `dev_size` examples, the rest. Examples that share a unit (a DROP
    passage: `extra["unit"]`) fall on one side together, so no passage is in both; dev may then hold a few
    more than dev_size. The draw depends only on the task, the items and the seed: a study's trials and its
    later test evaluation cut the same way."""
    import random
    units: dict[str, list] = {}
    for ex in examples:
        units.setdefault(str(ex.extra.get("unit", ex.id)), []).append(ex)
    if dev_size > len(examples):
        raise EvalError(f"a dev subset of {dev_size} {task} items is larger than the benchmark ({len(examples)}): "
                        "lower it in the study's objective")
    order = sorted(units)
    random.Random(f"{task}:{seed}").shuffle(order)
    dev_units, taken = set(), 0
    for unit in order:
        if taken >= dev_size:
            break
        dev_units.add(unit)
        taken += len(units[unit])
    dev = [ex for ex in examples if str(ex.extra.get("unit", ex.id)) in dev_units]
    return dev, [ex for ex in examples if str(ex.extra.get("unit", ex.id)) not in dev_units]


def limited(rows: list, limit: int | None) -> list:
    return rows if limit is None else rows[:limit]


# ----------------------------------------------------------------------------------------------- scoring
def starts_with(output: str, target: str) -> bool:
    """InstructEval's rule: the stripped output starts with the gold answer."""
    return output.strip().startswith(target)


def blank_line_after_answer(text: str) -> bool:
    """Stop rule of the few-shot tasks: every demonstration ends with a blank line, so once the output holds
    one after its first non-blank character, more tokens cannot change a starts-with match (for answers
    without a blank line or trailing whitespace, which holds for MMLU, BBH and DROP)."""
    return "\n\n" in text.lstrip()


def score_starts_with(examples: list[Example], outputs: list[str], **_) -> list[dict]:
    return [record(ex, out, starts_with(out, ex.target)) for ex, out in zip(examples, outputs)]


def record(ex: Example, output: str, correct: bool, **more) -> dict:
    return {"id": ex.id, "group": ex.group, "prompt_sha256": ex.prompt_hash, "n_shots": ex.n_shots,
            "target": ex.target, "output": output, "correct": bool(correct), **more}


def by_group(records: list[dict]) -> dict[str, dict]:
    groups: dict[str, list[bool]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r["correct"])
    return {g: {"score": sum(c) / len(c), "n": len(c), "correct": sum(c)} for g, c in sorted(groups.items())}


def micro(records: list[dict]) -> dict:
    """Mean over all examples (MMLU, DROP, HumanEval), with the per-group breakdown."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    return {"score": correct / n if n else None, "n": n, "correct": correct, "average": "micro",
            "groups": by_group(records)}


def macro(records: list[dict]) -> dict:
    """Mean of the per-group scores (BBH: each subset weighs the same)."""
    groups = by_group(records)
    score = sum(g["score"] for g in groups.values()) / len(groups) if groups else None
    return {"score": score, "n": len(records), "correct": sum(r["correct"] for r in records), "average": "macro",
            "groups": groups}
