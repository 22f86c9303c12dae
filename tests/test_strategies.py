"""Strategies beyond one GPU, on the CPU: FSDP2 over gloo ranks, QLoRA on a bitsandbytes NF4 base, and a stop or a
kill + resume under each (jobs/strategies.py, jobs/checkpoint.py's sharded layout).

    .venv/bin/python -m pytest -q tests/test_strategies.py

Tolerances (measured differences are in the report of the change that added them; the bounds keep a margin):
- FSDP on 2 ranks vs 1 process, same global batch, fp32: per-step losses and grad norms rel 1e-5, validation loss
  rel 1e-5, every adapter tensor within 1e-5 (abs). Gloo's reduce-scatter sums in another order than one process.
- QLoRA: the base's validation loss and the first step's training loss in NF4 within 2% of fp32 (NF4 rounds each
  weight to one of 16 levels per block of 64; measured 1.4% on the tiny model, whose 128-wide layers quantize
  worse than a 7B's); the trained adapter on the fp32 base within 2% of its validation loss on the NF4 base
  (measured 0.3%), and far below the base's.
- kill + resume vs uninterrupted: every adapter tensor within 1e-6 (abs): the same steps on the same data from
  the same saved state (measured: identical, under FSDP and under QLoRA with 8-bit AdamW); FSDP slices resumed
  by one process without FSDP within 1e-5.
bitsandbytes >= 0.49 runs NF4 and its 8-bit optimizers on the CPU (its multi-backend build); where it cannot, the
QLoRA tests skip with the import or kernel error as the reason, and their twins in tests/test_gpu.py run on CUDA.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jobs import finetune as F
from jobs.spec import DataSpec, SpecError, preset

from .conftest import REPO


def small(tmp_path, name, **kw):
    """The tiny preset on a 600-row mix, dropout 0 (the ranks' dropout draws differ from one process's)."""
    kw = {"max_steps": 12, "lr": 1e-3, "alpha": 32, "r": 8, "dropout": 0.0, "per_device_batch": 8, "log_every": 2,
          **kw}
    return preset("tiny", out=str(tmp_path / name), data=DataSpec(total_rows=600, cache_dir=str(tmp_path / "data")),
                  **kw)


def launch(spec, nproc: int, env=None, wait=True) -> list:
    """`python -m jobs.finetune --spec` as `nproc` ranks started by hand (RANK, WORLD_SIZE, MASTER_ADDR/PORT: what
    torchrun or srun give each rank); returns the processes, each killable on its own."""
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    path = Path(spec.out).with_suffix(".json")
    spec.to_json(path)
    port = str(29500 + (os.getpid() * 7 + nproc + int(time.time())) % 400)
    procs = [subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--spec", str(path)], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
                                   **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(nproc)]
    if wait:
        for proc in procs:
            output, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, output[-3000:]
    return procs


def losses(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def adapter(out) -> dict:
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def max_gap(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------------------------- the spec
@pytest.mark.unit
@pytest.mark.parametrize("changes,message", [
    ({"strategy": "zero3"}, "strategy='zero3' is invalid"),
    ({"quantization": "int4"}, "quantization='int4' is invalid"),
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing='yes' is invalid"),
    ({"double_quant": 1}, "double_quant=1 is invalid"),
    ({"optimizer": "sgd"}, "optimizer='sgd' is invalid"),
    ({"strategy": "fsdp", "quantization": "nf4"}, "strategy=fsdp with quantization=nf4 is not supported"),
    ({"strategy": "fsdp", "optimizer": "adamw_8bit"}, "optimizer=adamw_8bit with strategy=fsdp is not supported"),
])
def test_bad_strategy_settings_are_one_line_errors(changes, message):
    with pytest.raises(SpecError, match=message) as e:
        preset("tiny", **changes)
    assert "\n" not in str(e.value) and ": " in str(e.value)


@pytest.mark.unit
def test_strategy_settings_round_trip():
    spec = preset("tiny", strategy="fsdp", gradient_checkpointing=True)
    assert spec.replace(out="x").strategy == "fsdp" and spec.to_dict()["gradient_checkpointing"] is True
    assert preset("tiny", quantization="nf4", double_quant=False, optimizer="paged_adamw_8bit").quantization == "nf4"


# ----------------------------------------------------------------------------------------------- FSDP
@pytest.fixture(scope="module")
def fsdp_pair(tmp_path_factory):
    """The same global batch (16 examples per step) in one process, and over 2 gloo ranks with FSDP2 (with
    gradient checkpointing, which must change nothing)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = small(tmp, "single", grad_accum=2)
    assert F.run(single)["status"] == "ok"
    sharded = small(tmp, "fsdp", grad_accum=1, strategy="fsdp", gradient_checkpointing=True)
    launch(sharded, 2)
    return single, sharded


@pytest.mark.slow
def test_fsdp_on_two_ranks_trains_as_one_process(fsdp_pair):
    single, sharded = fsdp_pair
    one, two = (json.loads((Path(s.out) / "result.json").read_text()) for s in fsdp_pair)
    assert two["status"] == "ok" and two["world_size"] == 2 and two["strategy"] == "fsdp"
    assert two["train_tokens"] == one["train_tokens"]
    assert two["trainable_params"] == one["trainable_params"] and two["total_params"] == one["total_params"]
    a, b = losses(single.out), losses(sharded.out)
    assert [m["step"] for m in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), (x, y)
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    gap = max_gap(adapter(single.out), adapter(sharded.out))
    print(f"\n[fsdp] val_loss 1 process {one['val_loss']:.8f}, 2 ranks {two['val_loss']:.8f}; "
          f"max |adapter gap| {gap:.2e}")
    assert gap < 1e-5
    config = json.loads((Path(sharded.out) / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == json.loads(
        (Path(single.out) / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.mark.slow
def test_fsdp_killed_then_resumed_gives_the_same_adapter(fsdp_pair, tmp_path):
    """kill -9 of both ranks after the step-4 checkpoint (each rank wrote its slice), restart: the same adapter."""
    _, reference = fsdp_pair
    spec = reference.replace(out=str(tmp_path / "killed"), checkpoint_every=4)
    procs = launch(spec, 2, env={"LORA_HPO_MIN_STEP_S": "1.0"}, wait=False)  # 8 s left after step 4
    shards = Path(spec.out) / "checkpoints" / "step-0000004.shards"
    deadline = time.monotonic() + 300
    while len(list(shards.glob("rank-*-of-2.pt"))) < 2:
        assert all(p.poll() is None for p in procs), [p.stdout.read() for p in procs]
        assert time.monotonic() < deadline, "no complete checkpoint in 300 s"
        time.sleep(0.05)
    for proc in procs:
        proc.kill()
        proc.wait()
    assert not (Path(spec.out) / "result.json").exists(), "killed too late to test a resume"
    shutil.copytree(spec.out, tmp_path / "one-process")  # the same slices, resumed by one process below
    launch(spec, 2)
    result = json.loads((Path(spec.out) / "result.json").read_text())
    assert result["status"] == "ok" and result["resumed_from_step"] >= 4
    assert [m["step"] for m in losses(spec.out)] == list(range(1, 13)), "the curve has doubled or missing steps"
    gap = max_gap(adapter(reference.out), adapter(spec.out))
    # the slices put back together resume without FSDP too (one process, the same global batch)
    alone = F.run(spec.replace(out=str(tmp_path / "one-process"), strategy="ddp", grad_accum=2))
    assert alone["status"] == "ok" and alone["resumed_from_step"] == result["resumed_from_step"]
    gap_alone = max_gap(adapter(reference.out), adapter(tmp_path / "one-process"))
    print(f"\n[fsdp] resumed from step {result['resumed_from_step']}: max |adapter gap| {gap:.2e} on 2 ranks, "
          f"{gap_alone:.2e} in one process")
    assert gap < 1e-6 and gap_alone < 1e-5


@pytest.mark.slow
def test_fsdp_job_stopped_by_sigterm_saves_every_slice_and_resumes(fsdp_pair, tmp_path):
    """A 2-task job on the local executor (jobs.entry.FinetuneTrial, as a SLURM job's tasks run it) gets SIGTERM
    as a preemption sends it: every rank saves its slice of the last finished step and exits; the next job
    resumes from the newest complete set and ends with the reference adapter."""
    from jobs.entry import FinetuneTrial
    from slurm.backend import make_executor
    from slurm.executors import Resources

    _, reference = fsdp_pair
    spec = reference.replace(out=str(tmp_path / "stopped"), checkpoint_every=2)
    env = {"LORA_HPO_MIN_STEP_S": "0.5", "OMP_NUM_THREADS": "1"}
    executor = make_executor("local", tmp_path / "jobs", Resources(tasks_per_node=2, timeout_min=20))
    patch = pytest.MonkeyPatch()
    for k, v in env.items():
        patch.setenv(k, v)
    try:
        job = executor.submit(FinetuneTrial(), spec.to_dict())
        deadline = time.monotonic() + 300
        while not (Path(spec.out) / "metrics.jsonl").exists() or len(losses(spec.out)) < 5:
            assert not job.done(), job.stderr()
            assert time.monotonic() < deadline, "5 steps did not run in 300 s"
            time.sleep(0.05)
        os.kill(int(job.job_id), signal.SIGTERM)  # the controller forwards it to both tasks
        deadline = time.monotonic() + 120
        while not job.done():
            assert time.monotonic() < deadline, "the job did not stop on SIGTERM"
            time.sleep(0.1)
        stops = [r for r in _attempts(spec.out) if r.get("event") == "stop"]
        assert stops and stops[0]["signal"] == "SIGTERM", _attempts(spec.out)
        complete = sorted(p.name for p in (Path(spec.out) / "checkpoints").glob("step-*.shards")
                          if len(list(p.glob("rank-*-of-2.pt"))) == 2)
        assert complete, "no complete sharded checkpoint"
        saved = int(complete[-1][5:12])
        if stops[0]["saved"]:
            assert stops[0]["step"] >= saved >= 2
        assert not (Path(spec.out) / "result.json").exists()
        result = executor.submit(FinetuneTrial(), spec.to_dict()).results()[0]
    finally:
        patch.undo()
    assert result["status"] == "ok" and result["resumed_from_step"] == saved, (result.get("reason"), saved)
    starts = [r for r in _attempts(spec.out) if r.get("event") == "start"]
    assert sorted(r["rank"] for r in starts) == [0, 0, 1, 1], starts
    gap = max_gap(adapter(reference.out), adapter(spec.out))
    print(f"\n[fsdp] SIGTERM at step {stops[0]['step']}, resumed from {saved}: max |adapter gap| {gap:.2e}")
    assert gap < 1e-6


def _attempts(out):
    from jobs.contract import read_attempts
    return read_attempts(out)


# ----------------------------------------------------------------------------------------------- QLoRA
def _nf4_on_cpu() -> str | None:
    """Why bitsandbytes' NF4 cannot run here, or None when it can (a real 4-bit matmul and its backward)."""
    try:
        import bitsandbytes as bnb
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")  # quantizes the weight
        x = torch.randn(2, 64, requires_grad=True)
        layer(x).sum().backward()
    except Exception as e:  # noqa: BLE001 - any failure is the reason to skip, quoted
        first = (str(e).splitlines() or [""])[0][:200]
        return f"bitsandbytes NF4 does not run on this CPU: {type(e).__name__}: {first}"
    return None


NF4_SKIP = _nf4_on_cpu()
needs_nf4 = pytest.mark.skipif(NF4_SKIP is not None, reason=NF4_SKIP or "")


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    common = dict(eval_before=True, max_steps=16, grad_accum=2)
    full = F.run(small(tmp, "fp32", **common))
    nf4 = F.run(small(tmp, "nf4", quantization="nf4", **common))
    assert full["status"] == "ok" and nf4["status"] == "ok", (full.get("reason"), nf4.get("reason"))
    return tmp, full, nf4


@pytest.mark.slow
@needs_nf4
def test_qlora_base_loss_is_close_to_full_precision_and_training_lowers_it(qlora):
    tmp, full, nf4 = qlora
    base_gap = abs(nf4["val_loss_before"] - full["val_loss_before"]) / full["val_loss_before"]
    step0 = losses(tmp / "nf4")[0]["loss"], losses(tmp / "fp32")[0]["loss"]
    step0_gap = abs(step0[0] - step0[1]) / step0[1]
    print(f"\n[qlora] base val loss fp32 {full['val_loss_before']:.5f} nf4 {nf4['val_loss_before']:.5f} "
          f"({base_gap:.2%}); step-1 train loss fp32 {step0[1]:.5f} nf4 {step0[0]:.5f} ({step0_gap:.2%}); "
          f"trained: fp32 {full['val_loss']:.5f} nf4 {nf4['val_loss']:.5f}")
    assert base_gap < 0.02 and step0_gap < 0.02
    assert nf4["val_loss"] < nf4["val_loss_before"] - 0.3, "QLoRA did not learn"
    assert nf4["quantization"] == "nf4" and nf4["total_params"] == full["total_params"]
    assert nf4["trainable_params"] == full["trainable_params"]


@pytest.mark.slow
@needs_nf4
def test_qlora_adapter_loads_on_the_full_precision_base(qlora, tiny_model_dir, tiny_tokenizer):
    from jobs import data as D
    from jobs.adapter import load_adapter

    tmp, full, nf4 = qlora
    model, _ = load_adapter(str(tmp / "nf4" / "adapter"))  # its base (recorded by peft) in full precision
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    spec = small(tmp, "nf4")
    val, _ = D.tokenize(D.read_split(Path(nf4["data_folder"]), "val"), tiny_tokenizer, spec.max_seq_len)
    loss = F.validation_loss(F.ResponseLoss(model), val, spec, torch.device("cpu"), 0, 1, contextlib.nullcontext(),
                             tiny_tokenizer.pad_token_id)
    print(f"\n[qlora] adapter on the nf4 base {nf4['val_loss']:.5f}, on the fp32 base {loss:.5f}")
    assert loss == pytest.approx(nf4["val_loss"], rel=0.02)
    assert loss < full["val_loss_before"] - 0.3, "the adapter is not applied (or did not learn)"


@pytest.mark.slow
@needs_nf4
def test_qlora_killed_then_resumed_gives_the_same_adapter(tmp_path):
    """8-bit AdamW state (r=32: LoRA tensors of 4,096 values, bitsandbytes' threshold for 8-bit state) survives the
    checkpoint: the resumed run ends with the adapter of the uninterrupted one."""
    common = dict(quantization="nf4", optimizer="adamw_8bit", r=32, grad_accum=2, checkpoint_every=4)
    reference = F.run(small(tmp_path, "reference", **common))
    assert reference["status"] == "ok", reference.get("reason")
    spec = small(tmp_path, "killed", **common)
    Path(spec.out).mkdir(parents=True)
    spec.to_json(tmp_path / "killed.json")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--spec", str(tmp_path / "killed.json")],
                            cwd=REPO, env={**os.environ, "LORA_HPO_MIN_STEP_S": "1.0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list((Path(spec.out) / "checkpoints").glob("step-*.pt")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint in 300 s"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (Path(spec.out) / "result.json").exists(), "killed too late to test a resume"
    resumed = F.run(spec)
    assert resumed["status"] == "ok" and resumed["resumed_from_step"] >= 4
    gap = max_gap(adapter(tmp_path / "reference"), adapter(spec.out))
    print(f"\n[qlora] resumed from step {resumed['resumed_from_step']}: max |adapter gap| {gap:.2e}, val_loss "
          f"{reference['val_loss']:.7f} vs {resumed['val_loss']:.7f}")
    assert gap < 1e-6
    state = torch.load(sorted((Path(spec.out) / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
    assert any(t.dtype == torch.uint8 for t in _tensors(state["optimizer"]["state"])), "the optimizer state is not 8-bit"


def _tensors(tree):
    """Every tensor in nested dicts (bitsandbytes keeps its 8-bit state in one under each parameter)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)


@pytest.mark.unit
def test_a_4bit_layer_on_cpu_computes_the_same_way_on_every_cpu():
    """bitsandbytes' packed bf16 path (CPUs with AVX512-BF16, eval mode, no gradients) asserts out_features % 32 == 0
    and gives CPU-dependent losses: load() turns it off. Forced on here, so the test means the same on any CPU: a
    48-wide 4-bit layer then crashes in eval (the CI failure); after same_kernel_on_every_cpu it matches training
    mode's fp32 path exactly."""
    import bitsandbytes as bnb

    from jobs.strategies import same_kernel_on_every_cpu
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48, bias=False)
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")   # quantizes
    x = torch.randn(3, 64)
    with torch.no_grad():
        train_mode = layer.train()(x)
        layer.eval().support_avx512bf16_for_cpu = True
        with pytest.raises(AssertionError, match="divisible"):
            layer(x)
        assert same_kernel_on_every_cpu(torch.nn.Sequential(layer)) == 1
        assert torch.equal(layer(x), train_mode)
