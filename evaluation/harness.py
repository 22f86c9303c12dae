"""Any lm-evaluation-harness task on the same base model + LoRA adapter (optional: `pip install lm-eval`).

    python -m evaluation --harness lm-eval --tasks hellaswag,arc_easy --base meta-llama/Llama-2-7b-hf \\
        --adapter runs/study/trials/0007/adapter --limit 100
    python -m evaluation --harness lm-eval --tasks my_task --include-path tests/fixtures/lm_eval --base tiny ...

The model is lm-eval's "hf" model built from `pretrained=BASE,peft=ADAPTER,dtype=...` (the base and adapter
resolved as for the InstructEval tasks: `tiny`, runs:/..., models:/...). Before any task runs, every LoRA
tensor of the adapter file is checked in that model (evaluation.model.verify_lora): an adapter lm-eval
silently failed to apply is an error, not a base-model score. The result has the shape of
evaluation.runner.evaluate's: scores {task: main metric} (the first metric of the task's metric_list, or of
its results when it is a group), per-task summaries with every metric and the subtasks' as breakdown; the
protocols (prompts, shots, scoring) are lm-eval's own, not InstructEval's.
"""
from __future__ import annotations

import sys

from evaluation.tasks.common import EvalError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install lm-eval (or pip install -e .[lm-eval])"


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise EvalError(INSTALL_HINT) from None
    return lm_eval


def model_args(base_path: str, adapter_path: str | None, dtype: str) -> str:
    """lm-eval's "hf" model arguments: pretrained, peft (when an adapter is given), dtype."""
    for name, value in (("base", base_path), ("adapter", adapter_path)):
        if value and ("," in value or "=" in value):
            raise EvalError(f"{name} path {value!r} holds ',' or '=', which lm-eval's model_args cannot carry: "
                            "move or link it to a plain path")
    dtypes = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if dtype not in dtypes:
        raise EvalError(f"dtype {dtype!r} is unknown: choose {', '.join(dtypes)}")
    return ",".join([f"pretrained={base_path}"] + ([f"peft={adapter_path}"] if adapter_path else [])
                    + [f"dtype={dtypes[dtype]}"])


def evaluate(base: str | None, adapter: str | None, tasks, *, limit: int | None = None, batch_size: int = 8,
             device: str | None = None, dtype: str = "auto", out: str | None = None,
             include_path: str | None = None, num_fewshot: int | None = None, tracking_uri: str | None = None,
             protocol: dict | None = None, log=None) -> dict:
    """Scores of `base` (+ `adapter`) on lm-eval `tasks` (names, comma-separated or a list). `protocol`
    (EvaluationSpec.protocol()) is recorded in the result, to be logged with the scores."""
    from evaluation.model import check_device, resolve_adapter, resolve_base
    from evaluation.runner import versions

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise EvalError("no lm-eval task given: pass --tasks NAME[,NAME...]")
    lm_eval = require_lm_eval()
    check_device(device, dtype)  # a device or dtype this machine cannot run fails before anything loads
    folder = resolve_adapter(adapter, tracking_uri) if adapter else None
    base_path = resolve_base(base, folder)
    args = model_args(base_path, str(folder) if folder else None, dtype)
    manager = _task_manager(include_path, names)
    lm = _model(args, batch_size, device)
    info = {"base": base or base_path, "base_path": base_path, "adapter": adapter,
            "adapter_path": str(folder) if folder else None, "lora_modules": 0, "model_args": args}
    if folder is not None:
        from evaluation.model import verify_lora
        info.update(verify_lora(lm._model, folder))
    log(f"lm-eval {_version()}: {args} "
        f"({info['lora_modules']} LoRA modules), tasks {','.join(names)}")
    raw = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot,
                                  task_manager=manager, log_samples=False, bootstrap_iters=0)
    result = {"harness": "lm-eval", "model": info, "protocol": protocol or {},
              "versions": {**versions(), "lm-eval": _version()},
              "settings": {"limit": limit, "batch_size": batch_size, "num_fewshot": num_fewshot,
                           "include_path": include_path},
              "scores": {}, "tasks": {}}
    for name in names:
        metric, value, summary = main_metric(raw, name)
        result["scores"][name] = value
        result["tasks"][name] = summary
    if out:
        _write(result, out)
    return result


def _write(result: dict, out: str) -> None:
    import json
    from pathlib import Path

    from evaluation.runner import _atomic

    Path(out).mkdir(parents=True, exist_ok=True)
    _atomic(Path(out) / "scores.json", json.dumps(result, indent=2, default=str) + "\n")


def table(result: dict) -> str:
    """One line per task: its main metric and value, then the model line."""
    lines = [f"{'task':<24} {'metric':<20} {'value':>8}"]
    for name, t in result["tasks"].items():
        value = "-" if t["score"] is None else f"{t['score']:.4f}"
        lines.append(f"{name:<24} {str(t['metric']):<20} {value:>8}")
    m = result["model"]
    lines.append(f"model: {m['model_args']}  LoRA modules: {m['lora_modules']}")
    return "\n".join(lines)


def _task_manager(include_path: str | None, names: list[str]):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" (built-in tasks and {include_path})" if include_path else " (add --include-path for your own)"
        raise EvalError(f"lm-eval task {unknown[0]!r} is unknown{where}: `lm-eval ls tasks` lists them")
    return manager


def _model(args: str, batch_size: int, device: str | None):
    from lm_eval.api.registry import get_model

    extra = {"batch_size": batch_size, "device": device} if device else {"batch_size": batch_size}
    try:
        return get_model("hf").create_from_arg_string(args, extra)
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise EvalError(f"lm-eval could not load {args} ({type(e).__name__}: {first})") from None


def main_metric(raw: dict, name: str) -> tuple[str | None, float | None, dict]:
    """(metric key, value, summary) of one task or group in simple_evaluate's output."""
    results = raw.get("results", {})
    groups = raw.get("groups", {})
    metrics = groups.get(name) or results.get(name) or {}
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    preferred = [m.get("metric") for m in raw.get("configs", {}).get(name, {}).get("metric_list", [])]
    candidates = [k for k in numeric if "_stderr" not in k]
    fallback = candidates[0] if candidates else None
    key = next((k for p in preferred for k in candidates if k.split(",")[0] == p), fallback)
    subtasks = raw.get("group_subtasks", {}).get(name, [])
    breakdown = {s: {k: v for k, v in results.get(s, {}).items() if isinstance(v, (int, float))} for s in subtasks}
    n = raw.get("n-samples", {}).get(name, {}).get("effective")
    summary = {"score": numeric.get(key), "metric": key, "metrics": numeric, "n": n,
               "source": "lm-evaluation-harness", "breakdown": breakdown or None}
    return key, numeric.get(key), summary


def _version() -> str | None:
    import importlib.metadata as md
    try:
        return md.version("lm-eval")
    except md.PackageNotFoundError:
        return None
