"""InstructEval-protocol downstream scores (MMLU, BBH, DROP, HumanEval) of a base model + LoRA adapter.

    python -m evaluation --base tiny --adapter runs/demo/adapter --tasks mmlu,bbh --data-dir DIR --limit 5

    from evaluation import EvaluationSpec, evaluate
    result = evaluate(EvaluationSpec(base="tiny", adapter="runs/demo/adapter", tasks="mmlu", data_dir="DIR", limit=5))
    result["scores"]["mmlu"], result["model"]["lora_modules"], result["protocol"]

The protocol options (HumanEval cut, decoding, dtype, merge) default to InstructEval's; what matches the
reference and what differs: evaluation/PROTOCOL.md. Importing this package loads no torch.
"""
from evaluation.spec import EvaluationSpec, ProtocolError, evaluation_settings
from evaluation.tasks.common import EvalError


def evaluate(*args, **kwargs) -> dict:
    """See evaluation.runner.evaluate."""
    from evaluation.runner import evaluate as run
    return run(*args, **kwargs)


def score_completions(*args, **kwargs) -> dict:
    """See evaluation.runner.score_completions."""
    from evaluation.runner import score_completions as run
    return run(*args, **kwargs)


__all__ = ["EvalError", "EvaluationSpec", "ProtocolError", "evaluate", "evaluation_settings", "score_completions"]
