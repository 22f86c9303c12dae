"""The held-out downstream objective: trials scored on seeded dev subsets, the test evaluation on the rest.

    .venv/bin/python -m pytest -q tests/test_heldout.py

The dev/test cut is proven disjoint on the benchmark fixtures (no item, and for DROP no passage, on both
sides), then a real study (tiny fine-tunes, local executor) optimizes the held-out objective and its
`orchestrator evaluate` scores only items its trials never saw.
"""
import json
import os
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evaluation.tasks import get_tasks
from evaluation.tasks.common import EvalError, split_dev
from orchestrator.__main__ import main
from orchestrator.config import ConfigError, load_config
from orchestrator.study.loop import run_study

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def examples(name):
    task = get_tasks([name])[0]
    return task.build(task.load(str(FIXTURES)), lambda prompts: [0] * len(prompts))


@pytest.mark.parametrize("name, size", [("mmlu", 4), ("bbh", 3), ("drop", 1)])
def test_the_dev_and_test_items_never_meet(name, size):
    items = examples(name)
    dev, test = split_dev(items, size, seed=7, task=name)
    assert len(dev) >= size and len(dev) + len(test) == len(items)
    assert not {e.id for e in dev} & {e.id for e in test}
    if name == "drop":  # questions about one passage stay on one side
        passages = lambda part: {e.extra["unit"] for e in part}  # noqa: E731
        assert not passages(dev) & passages(test)
    again, _ = split_dev(items, size, seed=7, task=name)
    assert [e.id for e in again] == [e.id for e in dev]  # a study's trials and its test evaluation agree
    other, _ = split_dev(items, size, seed=8, task=name)
    assert name == "drop" or [e.id for e in other] != [e.id for e in dev]
    with pytest.raises(EvalError, match="larger than the benchmark"):
        split_dev(items, len(items) + 1, seed=7, task=name)


def test_a_dev_subset_larger_than_the_benchmark_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="objective.tasks.mmlu.*the benchmark has 11 here"):
        load_config(None, objective={"metric": "heldout", "tasks": {"mmlu": 11}},
                    evaluation={"data_dir": str(FIXTURES)})
    with pytest.raises(ConfigError, match="objective.tasks"):
        load_config(None, objective={"metric": "heldout", "tasks": {"gsm8k": 10}})


@pytest.mark.slow
def test_a_heldout_study_logs_dev_scores_and_its_test_evaluation_uses_other_items(tmp_path):
    cfg = load_config(None, study="held", algo="random", budget=2, parallel=2, executor="local", poll_s=0.3, seed=3,
                      workdir=str(tmp_path / "runs"), tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                      objective={"metric": "heldout", "tasks": {"mmlu": 4, "drop": 1}, "seed": 5},
                      evaluation={"data_dir": str(FIXTURES), "batch_size": 4},
                      trial={"max_steps": 6, "data": {"total_rows": 300}})
    state = run_study(cfg, out=open(os.devnull, "w"))
    assert all(t.status == "ok" for t in state.finished), [t.reason for t in state.finished]
    client = MlflowClient(cfg.tracking())
    for t in state.finished:
        result = json.loads((Path(t.out) / "result.json").read_text())
        assert t.value == pytest.approx(result["heldout"]) and 0 <= t.value <= 1  # weight_val_loss 0: 1 - accuracy
        accuracy = (4 * result["dev.mmlu"] + 1 * result["dev.drop"]) / 5
        assert result["heldout"] == pytest.approx(1 - accuracy)
        metrics = client.get_run(t.run_id).data.metrics
        assert {"dev.mmlu", "dev.drop", "heldout", "val_loss"} <= set(metrics)
        assert metrics["heldout"] == pytest.approx(t.value)

    args = ["evaluate", "--study", "held", "--workdir", cfg.workdir, "--tracking-uri", cfg.tracking(), "--top", "1",
            "--tasks", "mmlu,drop", "--executor", "local", "--poll", "0.3"]
    assert main(args) == 0
    best = min(state.finished, key=lambda t: t.value)
    seen = ids(Path(best.out) / "dev-evaluation" / "records")
    [evaluation] = list((cfg.folder / "evaluations").iterdir())
    tested = ids(evaluation / "records")
    for task in ("mmlu", "drop"):
        assert seen[task] and tested[task] and not seen[task] & tested[task], task
        assert seen[task] | tested[task] == {e.id for e in examples(task)}
    spec = json.loads((evaluation / "spec.json").read_text())
    assert spec["split"] == "test" and spec["dev_sizes"] == {"mmlu": 4, "drop": 1} and spec["split_seed"] == 5


def ids(records: Path) -> dict:
    return {p.stem: {json.loads(line)["id"] for line in p.read_text().splitlines()} for p in records.glob("*.jsonl")}
