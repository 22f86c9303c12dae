"""InstructEval-protocol downstream scores (MMLU, BBH, DROP, HumanEval) of a base model + LoRA adapter.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh --data-dir DIR --limit 5

    from evaluation import evaluate
    result = evaluate("tiny", "runs/demo/adapter", ["mmlu"], data_dir="DIR", limit=5)
    result["scores"]["mmlu"], result["model"]["lora_modules"]

What matches the reference and what differs: evaluation/PROTOCOL.md. Importing this package loads no torch.
"""
from evaluation.tasks.common import EvalError


def evaluate(*args, **kwargs) -> dict:
    """See evaluation.runner.evaluate."""
    from evaluation.runner import evaluate as run
    return run(*args, **kwargs)


def score_completions(*args, **kwargs) -> dict:
    """See evaluation.runner.score_completions."""
    from evaluation.runner import score_completions as run
    return run(*args, **kwargs)


__all__ = ["EvalError", "evaluate", "score_completions"]
