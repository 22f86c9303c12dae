"""The evaluator on the tiny model: the adapter really applied, batching faithful, CLI end to end, errors.

    .venv/bin/python -m pytest tests/test_eval_model.py -q     # about a minute (trains a tiny adapter first)
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import EvalError, EvaluationSpec, evaluate
from evaluation.generate import generate, generate_one_by_one, token_counter
from evaluation.model import load, resolve_adapter
from evaluation.tasks import get_tasks

from .conftest import REPO

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    from jobs.finetune import run
    from jobs.spec import preset

    out = tmp_path_factory.mktemp("trained")
    result = run(preset("tiny", out=str(out), max_steps=30, lr=1e-3))
    assert result["status"] == "ok", result["reason"]
    return out / "adapter"


@pytest.fixture(scope="module")
def prompts(tiny_model_dir):
    """Fixture prompts of every task (HumanEval: the first three real problems)."""
    _, tokenizer, _ = load("tiny")
    out = {}
    for task in get_tasks("mmlu,bbh,drop,humaneval"):
        examples = task.build(task.load(FIXTURES), token_counter(tokenizer), 3 if task.name == "humaneval" else 2, 0)
        out[task.name] = (task, [e.prompt for e in examples])
    return out


def test_the_adapter_is_in_the_model_and_changes_greedy_outputs(adapter_dir, prompts):
    base, tokenizer, base_info = load("tiny")
    tuned, _, info = load("tiny", str(adapter_dir))
    unmerged, _, _ = load("tiny", str(adapter_dir), merge=False)
    assert base_info["lora_modules"] == 0
    assert (info["lora_modules"], info["lora_tensors"], info["lora_b_nonzero"]) == (4, 8, 4)  # 2 layers x q, v
    changed = total = 0
    for task, texts in prompts.values():
        a = generate(base, tokenizer, texts, min(task.max_new_tokens, 16))
        b = generate(tuned, tokenizer, texts, min(task.max_new_tokens, 16))
        assert generate(unmerged, tokenizer, texts, min(task.max_new_tokens, 16)) == b  # merging is exact enough
        changed += sum(x != y for x, y in zip(a, b))
        total += len(texts)
    assert changed >= total // 2, f"only {changed} of {total} greedy outputs changed with the adapter"


def test_batched_generation_gives_the_one_by_one_outputs(prompts, tiny_model_dir):
    model, tokenizer, _ = load("tiny")
    texts = [p for _, ps in prompts.values() for p in ps]  # very different lengths: real left padding
    ours = generate(model, tokenizer, texts, 24, batch_size=4, suppress_eos=True)
    assert ours == generate_one_by_one(model, tokenizer, texts, 24, suppress_eos=True)
    assert generate(model, tokenizer, texts, 24) == generate_one_by_one(model, tokenizer, texts, 24)


def test_a_stop_rule_ends_each_row_early_and_only_then(prompts, tiny_model_dir):
    model, tokenizer, _ = load("tiny")
    texts = [p for _, ps in prompts.values() for p in ps]
    rule = lambda text: text.count(".") >= 3  # noqa: E731
    full = generate_one_by_one(model, tokenizer, texts, 32, suppress_eos=True)
    stopped = generate(model, tokenizer, texts, 32, stop=rule, batch_size=4, suppress_eos=True)
    for s, f in zip(stopped, full):
        assert f.startswith(s) and (rule(s) or s == f)
    assert sum(len(s) < len(f) for s, f in zip(stopped, full)) >= len(texts) // 2


def test_command_line_end_to_end_on_fixtures(tmp_path, adapter_dir):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "evaluation", "--base", "tiny", "--adapter", str(adapter_dir),
                           "--tasks", "mmlu,bbh,drop,humaneval", "--data-dir", str(FIXTURES), "--limit", "2",
                           "--out", str(out), "--batch-size", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mmlu" in proc.stdout and "LoRA modules: 4" in proc.stdout
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["scores"]) == {"mmlu", "bbh", "drop", "humaneval"}
    assert scores["model"]["lora_modules"] == 4 and scores["model"]["adapter_path"] == str(adapter_dir)
    tasks = scores["tasks"]
    assert [tasks[t]["n"] for t in ("mmlu", "bbh", "drop", "humaneval")] == [6, 6, 2, 2]
    assert set(tasks["mmlu"]["groups"]) == {"astronomy", "elementary_mathematics", "high_school_geography"}
    assert tasks["bbh"]["average"] == "macro" and len(tasks["bbh"]["groups"]) == 3
    assert tasks["humaneval"]["temperature"] == 0.1 and tasks["humaneval"]["sandbox"]["network"] in ("netns", "guard")
    # the reference protocol, logged with the scores: the tiny checkpoint's generation_config does not sample,
    # so MMLU is greedy; HumanEval samples at InstructEval's 0.1 with the library defaults of the time
    assert scores["protocol"]["eval.protocol.decoding"] == "reference"
    assert (scores["protocol"]["eval.protocol.dtype"], scores["model"]["merged"]) == ("fp32", False)
    assert scores["decoding"]["mmlu"] == {"do_sample": False}
    assert scores["decoding"]["humaneval"] == {"do_sample": True, "temperature": 0.1, "top_p": 1.0, "top_k": 50}
    for name in tasks:
        records = [json.loads(line) for line in (out / "records" / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == tasks[name]["n"]
        assert all({"id", "prompt_sha256", "output", "correct", "target", "n_shots"} <= set(r) for r in records)
        assert sum(r["correct"] for r in records) == tasks[name]["correct"]


def test_a_wrong_adapter_is_an_error_never_the_base_model(tmp_path):
    (tmp_path / "empty").mkdir()
    for ref, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no adapter_config.json")):
        with pytest.raises(EvalError, match=why):
            evaluate(EvaluationSpec(base="tiny", adapter=str(ref), tasks="drop", data_dir=str(FIXTURES), limit=1))
    proc = subprocess.run([sys.executable, "-m", "evaluation", "--base", "tiny", "--adapter", str(tmp_path / "x"),
                           "--tasks", "drop", "--data-dir", str(FIXTURES), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: adapter") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_an_adapter_whose_tensors_do_not_land_is_refused(tmp_path, adapter_dir):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k.replace("layers.1.", "layers.7."): v for k, v in weights.items()},
              str(broken / "adapter_model.safetensors"))
    with pytest.raises(EvalError, match="was not applied"):
        load("tiny", str(broken))


def test_mlflow_references_are_read_from_the_given_store(tmp_path, adapter_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")  # must not be the one read
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp).info.run_id
    client.log_artifacts(run, str(adapter_dir), "trained/adapter")  # a fine-tune output folder: adapter/ inside
    client.create_registered_model("tiny-nomad")
    version = client.create_model_version("tiny-nomad", source=f"{client.get_run(run).info.artifact_uri}/trained",
                                          run_id=run)
    client.set_registered_model_alias("tiny-nomad", "champion", version.version)
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    for ref in ("models:/tiny-nomad@champion", f"runs:/{run}/trained"):
        folder = resolve_adapter(ref, uri)
        assert folder.name == "adapter" and (folder / "adapter_model.safetensors").read_bytes() == weights
    with pytest.raises(EvalError, match=f"could not be downloaded from MLflow store {uri}"):
        resolve_adapter("models:/tiny-nomad@missing", uri)
    with pytest.raises(EvalError, match="could not be downloaded from MLflow store .*other.db"):
        resolve_adapter(f"runs:/{run}/trained")  # the environment's store, where this run does not exist


def test_sampling_at_temperature_0_1_is_reproducible_with_its_seed(prompts, tiny_model_dir):
    model, tokenizer, _ = load("tiny")
    _, texts = prompts["humaneval"]
    runs = [generate(model, tokenizer, texts, 24, temperature=0.1, seed=7, batch_size=2, suppress_eos=True)
            for _ in range(2)]
    assert runs[0] == runs[1]
