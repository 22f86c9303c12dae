"""The blackbox recipe on the tiny model: real transformers + peft training on the CPU."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import data as D
from jobs import finetune as F
from jobs.spec import DataSpec, FinetuneSpec, SpecError, preset

from .conftest import REPO


def small(tmp_path, name="run", **kw) -> FinetuneSpec:
    """The tiny preset on a 600-row mix: seconds per run."""
    kw = {"max_steps": 24, "lr": 1e-3, "alpha": 32, "r": 8, "dropout": 0.05, **kw}
    return preset("tiny", out=str(tmp_path / name),
                  data=DataSpec(total_rows=600, cache_dir=str(tmp_path / "data")), **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    spec = small(tmp, eval_before=True, eval_every=12)
    return spec, F.run(spec)


def test_tiny_run_learns_and_writes_its_outputs(finished):
    spec, result = finished
    out = Path(spec.out)
    assert result["status"] == "ok", result.get("reason")
    assert result["val_loss"] < result["val_loss_before"] - 0.3, "the adapter did not learn"
    on_disk = json.loads((out / "result.json").read_text())
    assert on_disk["val_loss"] == result["val_loss"] and on_disk["spec"]["r"] == 8
    for key in ("train_loss", "tokens_per_s", "train_s", "peak_memory_bytes", "trainable_params", "versions"):
        assert on_disk[key], key
    assert 0 < result["trainable_params"] < result["total_params"] / 5
    assert FinetuneSpec.from_json(out / "spec.json") == spec
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in lines if "loss" in m]
    assert steps == list(range(1, 25))
    assert all(math.isfinite(m["loss"]) and m["lr"] >= 0 and m["grad_norm"] >= 0 for m in lines if "loss" in m)
    assert [m["step"] for m in lines if "val_loss" in m] == [12, 24]
    assert (out / "adapter" / "adapter_config.json").exists()
    # warmup then cosine decay to zero
    lrs = [m["lr"] for m in lines if "lr" in m]
    assert max(lrs) == pytest.approx(1e-3, rel=0.05) and lrs[-1] == pytest.approx(0, abs=1e-9)


def test_saved_adapter_reloads_with_peft_and_reproduces_val_loss(finished, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, result = finished
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      str(Path(spec.out) / "adapter"))
    val, _ = D.tokenize(D.read_split(Path(result["data_folder"]), "val"), tokenizer, spec.max_seq_len)
    loss = F.validation_loss(F.ResponseLoss(model), val, spec, torch.device("cpu"), 0, 1, contextlib.nullcontext())
    assert loss == pytest.approx(result["val_loss"], rel=1e-5)


def test_a_finished_folder_is_not_trained_again(finished):
    spec, result = finished
    again = F.run(spec)
    assert again["val_loss"] == result["val_loss"] and again["total_s"] == result["total_s"]


def test_right_padding_without_a_mask_changes_no_loss(tiny_model_dir, tiny_tokenizer):
    """The recipe runs padded rows with no attention mask: causal attention hides the padding."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    rows = [{"instruction": "What is 3 plus 4?", "context": "", "response": "7"},
            {"instruction": "Who?", "context": "Alice went home with a long story to tell.", "response": "Alice."},
            {"instruction": "Sort.", "context": "3, 1, 2", "response": "1, 2, 3"}]
    examples, _ = D.tokenize(rows, tiny_tokenizer, 256)
    assert len({len(ids) for ids, _ in examples}) == 3, "the test needs rows of different lengths"
    loss_fn = F.ResponseLoss(model)
    with torch.no_grad():
        padded_sum, padded_count = loss_fn(**F.collate(examples, tiny_tokenizer.pad_token_id))
        alone = [loss_fn(**F.collate([e], tiny_tokenizer.pad_token_id)) for e in examples]
    assert padded_count == sum(c for _, c in alone) == sum(F.loss_tokens(e) for e in examples)
    assert padded_sum.item() == pytest.approx(sum(s.item() for s, _ in alone), rel=1e-5)


@pytest.mark.parametrize("window", [0, 16])
def test_epoch_plan_is_seeded_and_covers_each_example_once(window):
    lengths = [int(x) for x in torch.randint(10, 300, (1000,), generator=torch.Generator().manual_seed(0))]
    spec = preset("tiny", per_device_batch=4, grad_accum=8, group_window=window)
    plan = F.epoch_plan(lengths, spec, 1, 0)
    assert plan == F.epoch_plan(lengths, spec, 1, 0) and plan != F.epoch_plan(lengths, spec, 1, 1)
    assert all(len(step) == 8 and all(len(mb) == 4 for mb in step) for step in plan)
    seen = [i for step in plan for mb in step for i in mb]
    assert len(seen) == len(set(seen)) == 1000 - 1000 % 32
    if window == 0:  # a step's micro-batches are ordered by length; the step itself is a random sample
        for step in plan:
            flat = [lengths[i] for mb in step for i in mb]
            assert flat == sorted(flat)
    waste = sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb) for step in plan for mb in step)
    assert waste / sum(lengths[i] for i in seen) < (0.1 if window else 0.2)


def test_dropout_one_trains_nothing(tmp_path):
    result = F.run(small(tmp_path, dropout=1.0, eval_before=True, max_steps=6))
    assert result["status"] == "ok"
    assert result["val_loss"] == pytest.approx(result["val_loss_before"], abs=1e-6)


def test_learning_rate_and_rank_shape_the_loss(tmp_path):
    losses = {(r, lr): F.run(small(tmp_path, f"r{r}-lr{lr}", r=r, lr=lr, max_steps=16))["val_loss"]
              for r, lr in ((8, 1e-5), (8, 1e-3), (64, 1e-3))}
    assert losses[(8, 1e-3)] < losses[(8, 1e-5)] - 0.3
    assert losses[(64, 1e-3)] != pytest.approx(losses[(8, 1e-3)], abs=1e-3)


def _spawn(spec_path: Path):
    return subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--spec", str(spec_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy())


def test_killed_job_resumes_from_its_checkpoint_to_the_same_result(tmp_path):
    """kill -9 mid-run (as SLURM preemption would), restart on the same folder: same result as uninterrupted."""
    spec = small(tmp_path, "interrupted", max_steps=40, checkpoint_every=8, dropout=0.1)
    reference = F.run(spec.replace(out=str(tmp_path / "reference")))
    Path(spec.out).mkdir(parents=True)
    spec.to_json(tmp_path / "spec.json")
    proc = _spawn(tmp_path / "spec.json")
    deadline = time.time() + 120
    while not list((Path(spec.out) / "checkpoints").glob("step-*.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(spec.out) / "result.json").exists(), "killed too late to test a resume"
    assert not (Path(spec.out) / "adapter").exists()
    resumed = F.run(spec)
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] >= 8
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-6, abs=1e-7)
    steps = [json.loads(x)["step"] for x in (Path(spec.out) / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 41)), "the curve has doubled or missing steps after the resume"


@pytest.mark.parametrize("field,value", [("r", 0), ("alpha", 0), ("alpha", -1.0), ("dropout", 1.5),
                                         ("dropout", -0.1), ("lr", 0.0), ("lr", -1e-4)])
def test_invalid_hyperparameters_are_a_failed_result(tmp_path, field, value):
    spec = small(tmp_path).to_dict()
    spec[field] = value
    result = F.run(spec)
    assert result["status"] == "failed" and field in result["reason"]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"
    assert not (tmp_path / "run" / "adapter").exists()
    with pytest.raises(SpecError, match=field):
        FinetuneSpec.from_dict(spec)


def test_missing_and_malformed_data_are_failed_results(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "response": "y"}\n{oops\n')
    for name, reason in ((str(tmp_path / "missing.jsonl"), "does not exist"), (str(bad), "malformed")):
        spec = small(tmp_path).replace(data={"sources": [{"name": name}], "cache_dir": str(tmp_path / "d")})
        result = F.run(spec)
        assert result["status"] == "failed" and reason in result["reason"], result["reason"]


def test_diverging_loss_is_a_failed_result(tmp_path):
    # the largest learning rate the spec accepts, no clipping, and a LoRA scale (alpha / r) of 1.25e8
    result = F.run(small(tmp_path, lr=1.0, alpha=1e9, max_grad_norm=1e30, max_steps=10, warmup_ratio=0.0))
    assert result["status"] == "failed"
    assert "diverged" in result["reason"] and not (tmp_path / "run" / "adapter").exists()


def test_out_of_memory_is_a_failed_result(tmp_path, monkeypatch):
    # MOCK (named as such): a real OOM needs a GPU; raise torch's own OOM error from the forward pass.
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(F.ResponseLoss, "forward", oom)
    result = F.run(small(tmp_path))
    assert result["status"] == "failed" and result["reason"].startswith("out of memory")


def test_base_model_from_a_local_hf_folder(tmp_path, tiny_model_dir):
    import shutil
    local = tmp_path / "my-base-model"
    shutil.copytree(tiny_model_dir, local)
    result = F.run(small(tmp_path, base_model=str(local), max_steps=4))
    assert result["status"] == "ok"
    missing = F.run(small(tmp_path, "m", base_model=str(tmp_path / "nope"), max_steps=4))
    assert missing["status"] == "failed" and "does not exist" in missing["reason"]


def test_command_line_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "jobs.finetune", "--preset", "tiny", "--max-steps", "2",
                         "--r", "8", "--alpha", "16", "--dropout", "0.05", "--lr", "1e-3",
                         "--out", str(tmp_path / "cli")], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout.splitlines()[-1])["steps"] == 2
    bad = subprocess.run([sys.executable, "-m", "jobs.finetune", "--r", "0", "--out", str(tmp_path / "x")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "r=0" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists(), "a rejected command line must write nothing"
    failed = subprocess.run([sys.executable, "-m", "jobs.finetune", "--spec", str(tmp_path / "cli" / "spec.json"),
                             "--out", str(tmp_path / "y"), "--base-model", "/nonexistent/model"],
                            cwd=REPO, capture_output=True, text=True)
    assert failed.returncode == 1 and json.loads((tmp_path / "y" / "result.json").read_text())["status"] == "failed"


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    """The multi-GPU path (torchrun, DDP) run on CPU with gloo: 2 ranks x 1 micro-batch == 1 rank x 2."""
    common = dict(max_steps=6, dropout=0.0, per_device_batch=8, log_every=2)
    single = F.run(small(tmp_path, "single", grad_accum=2, **common))
    spec = small(tmp_path, "ddp", grad_accum=1, **common)
    Path(spec.out).mkdir(parents=True)
    spec.to_json(tmp_path / "ddp.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "jobs.finetune", "--spec", str(tmp_path / "ddp.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads((Path(spec.out) / "result.json").read_text())
    assert ddp["status"] == "ok" and ddp["world_size"] == 2
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
    assert ddp["train_tokens"] == single["train_tokens"]


def test_validation_loss_token_and_trainer_averages(tiny_model_dir, tiny_tokenizer):
    """token: summed loss / response tokens of the split; batch: the HF Trainer's evaluate() - the transformers
    model's own loss per batch of per_device_batch consecutive rows, averaged weighted by rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    rows = [{"instruction": f"Add {i} and {i}.", "context": "", "response": " ".join(["twice"] * (1 + 3 * (i % 4)))}
            for i in range(10)]
    examples, _ = D.tokenize(rows, tiny_tokenizer, 256)
    spec = preset("tiny", per_device_batch=4)
    args = (spec, torch.device("cpu"), 0, 1, contextlib.nullcontext(), tiny_tokenizer.pad_token_id)
    token = F.validation_loss(F.ResponseLoss(model), examples, *args)
    batch = F.validation_loss(F.ResponseLoss(model), examples, spec.replace(val_loss_average="batch"), *args[1:])
    with torch.no_grad():
        per_row = [F.ResponseLoss(model)(**F.collate([e], tiny_tokenizer.pad_token_id)) for e in examples]
        trainer = []
        for i in range(0, len(examples), 4):
            b = F.collate(examples[i:i + 4], tiny_tokenizer.pad_token_id)
            loss = model(input_ids=b["input_ids"], attention_mask=b["input_ids"] != tiny_tokenizer.pad_token_id,
                         labels=b["labels"]).loss
            trainer.append((loss.item(), len(examples[i:i + 4])))
    assert token == pytest.approx(sum(s.item() for s, _ in per_row) / sum(c.item() for _, c in per_row), rel=1e-5)
    assert batch == pytest.approx(sum(v * n for v, n in trainer) / len(examples), rel=1e-5)
    assert abs(token - batch) > 1e-4  # responses of different lengths: the two averages differ


def test_intermediate_validation_at_fractions_on_a_fixed_subset(tmp_path):
    result = F.run(small(tmp_path, eval_fractions=[0.25, 0.5], eval_subset=20))
    assert result["status"] == "ok", result.get("reason")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    partial = [r for r in records if "fraction" in r]
    assert [(r["step"], r["fraction"], r["subset"]) for r in partial] == [(6, 0.25, 20), (12, 0.5, 20)]
    assert all(math.isfinite(r["val_loss"]) for r in partial)
    assert partial[0]["val_loss"] > partial[1]["val_loss"] > 0  # learning shows on the subset too
    final = [r for r in records if "val_loss" in r and "fraction" not in r]
    assert final[-1]["step"] == 24 and final[-1]["val_loss"] == pytest.approx(result["val_loss"])
    with pytest.raises(SpecError, match="eval_fractions"):
        small(tmp_path, eval_fractions=[1.5])
    with pytest.raises(SpecError, match="eval_subset"):
        small(tmp_path, eval_subset=0)
