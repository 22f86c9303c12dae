"""The GPU tier: what only a CUDA device exercises (bf16 + tf32, fused AdamW, NCCL, bf16 evaluation, QLoRA on
bitsandbytes' CUDA kernels, FSDP over NCCL, the memory model against measured peaks).

    .venv/bin/python -m pytest -q -m gpu tests/test_gpu.py        # on a machine with a CUDA GPU
    bench/gpu_smoke.sh                                           # these tests, then the throughput bench

Skipped, saying why, where CUDA is absent (two GPUs for the NCCL test). A ~1B-parameter Llama with random
weights (the tiny model's tokenizer, so no hub is needed) is written once per session and trained through the
real recipe (jobs.finetune.run).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible here)")]
REPO = Path(__file__).resolve().parents[1]
ONE_B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=22, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048, rms_norm_eps=1e-5)


def llama_1b(folder: Path, tokenizer_dir: str) -> int:
    """A random ~1.1B-parameter Llama in `folder` (bf16 safetensors) with the tiny model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **ONE_B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="session")
def one_b(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-1b")
    return str(folder), llama_1b(folder, str(tiny_model_dir))


def test_two_bf16_lora_steps_on_a_1b_llama(one_b, tmp_path):
    from jobs import finetune
    from jobs.spec import preset

    folder, n_params = one_b
    assert 0.9e9 < n_params < 1.3e9
    spec = preset("tiny", base_model=folder, max_steps=2, per_device_batch=4, grad_accum=2, max_seq_len=256,
                  out=str(tmp_path / "trial"), log_every=1, precision="auto", data={"total_rows": 200})
    torch.cuda.reset_peak_memory_stats()
    result = finetune.run(spec)
    assert result["status"] == "ok", result["reason"]
    assert result["dtype"] == "bfloat16" and result["device"].startswith("cuda")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    losses = [json.loads(line)["loss"] for line in (tmp_path / "trial" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(map(lambda v: v == v and abs(v) < 1e4, losses))
    assert result["peak_memory_bytes"] > 2e9  # the bf16 weights alone are 2.2 GB
    print(f"\n[gpu] 1B bf16 LoRA: {result['tokens_per_s']:.0f} tokens/s, peak {result['peak_memory_bytes'] / 2**30:.1f} "
          f"GiB on {torch.cuda.get_device_name()}")


def test_the_recipe_uses_fused_adamw_on_cuda(tiny_model_dir):
    from jobs.finetune import set_up
    from jobs.spec import preset

    s = set_up(preset("tiny", max_steps=1, data={"total_rows": 100}), 0, 1, 0)
    assert s.device.type == "cuda" and s.optimizer.defaults.get("fused") is True


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for NCCL")
def test_two_ranks_with_nccl_equal_one_rank(tiny_model_dir, tmp_path):
    """The same global batch on 1 GPU (grad_accum 4) and on 2 GPUs (grad_accum 2 each): the same loss."""
    common = ["--preset", "tiny", "--max-steps", "6", "--r", "8", "--alpha", "16", "--lr", "1e-3",
              "--per-device-batch", "4", "--precision", "fp32"]
    one = subprocess.run([sys.executable, "-m", "jobs.finetune", *common, "--grad-accum", "4",
                          "--out", str(tmp_path / "one")], cwd=REPO, capture_output=True, text=True, timeout=900)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                          "jobs.finetune", *common, "--grad-accum", "2", "--out", str(tmp_path / "two")],
                         cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "NCCL_DEBUG": "WARN"})
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "result.json").read_text())
    b = json.loads((tmp_path / "two" / "result.json").read_text())
    assert b["world_size"] == 2 and b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)


def test_evaluation_in_bf16_unmerged_matches_fp32(tiny_model_dir, tmp_path):
    """Logits of (tiny base + a trained adapter) in bf16 with the adapter unmerged are within bf16 rounding of
    fp32 (the reference's precision)."""
    from jobs import finetune
    from jobs.adapter import load_adapter
    from jobs.spec import preset

    result = finetune.run(preset("tiny", max_steps=4, lr=1e-3, out=str(tmp_path / "t"), data={"total_rows": 100}))
    assert result["status"] == "ok"
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]], device="cuda")
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_adapter(str(tmp_path / "t" / "adapter"), dtype=dtype)
        with torch.no_grad():
            logits[dtype] = model.to("cuda")(input_ids=ids).logits.float()
    gap = (logits[torch.bfloat16] - logits[torch.float32]).abs().max().item()
    scale = logits[torch.float32].abs().max().item()
    assert gap < 0.05 * scale, (gap, scale)
    print(f"\n[gpu] bf16 unmerged vs fp32: max |logit gap| {gap:.4f} (max |logit| {scale:.2f})")


# ----------------------------------------------------------------------------------------------- strategies
def _one_b_spec(folder, out, **kw):
    from jobs.spec import preset
    return preset("tiny", base_model=folder, max_steps=3, per_device_batch=4, grad_accum=2, max_seq_len=256,
                  out=str(out), log_every=1, precision="auto", data={"total_rows": 200}, dropout=0.0, **kw)


def _first_loss(out) -> float:
    return next(json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line)


def test_qlora_on_a_1b_llama_trains_in_less_memory_close_to_bf16(one_b, tmp_path):
    """The GPU twin of tests/test_strategies.py's QLoRA tests: NF4 with bf16 compute on CUDA (bitsandbytes' CUDA
    kernels), paged AdamW; its step-1 loss within 2% of bf16's, its peak memory under bf16's, and jobs/memory.py's
    estimate of both peaks with its error printed."""
    from jobs import finetune
    from jobs.memory import estimate_spec

    folder, _ = one_b
    runs = {}
    for name, extra in (("bf16", {}), ("nf4", {"quantization": "nf4"})):
        spec = _one_b_spec(folder, tmp_path / name, **extra)
        torch.cuda.reset_peak_memory_stats()
        result = finetune.run(spec)
        assert result["status"] == "ok", result["reason"]
        runs[name] = (spec, result)
    (bf16, a), (nf4, b) = runs["bf16"], runs["nf4"]
    assert b["quantization"] == "nf4" and b["peak_memory_bytes"] < 0.7 * a["peak_memory_bytes"]
    gap = abs(_first_loss(nf4.out) - _first_loss(bf16.out)) / _first_loss(bf16.out)
    assert gap < 0.02, gap
    for name, (spec, result) in runs.items():
        measured = result["peak_memory_bytes"] / 2 ** 30
        estimate = estimate_spec(spec.to_dict(), 1)["peak_gb"]
        print(f"\n[gpu] 1B {name}: {result['tokens_per_s']:.0f} tokens/s, peak {measured:.2f} GiB, "
              f"estimate {estimate:.2f} GiB ({(estimate - measured) / measured:+.1%}), step-1 loss gap {gap:.2%}")
        assert abs(estimate - measured) / measured < 0.5


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs for FSDP over NCCL")
def test_fsdp_on_two_gpus_equals_one_gpu_and_shards_the_weights(one_b, tmp_path):
    """The same global batch on 1 GPU (ddp, grad_accum 2) and FSDP over 2 GPUs (grad_accum 1), fp32 for an exact
    comparison: the same losses; rank 0's peak below the single GPU's (it holds half of the weights)."""
    folder, _ = one_b
    one = _one_b_spec(folder, tmp_path / "one", precision="fp32")
    from jobs import finetune
    a = finetune.run(one)
    two = _one_b_spec(folder, tmp_path / "two", precision="fp32", strategy="fsdp", grad_accum=1)
    Path(two.out).mkdir(parents=True)
    two.to_json(tmp_path / "two.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "jobs.finetune", "--spec", str(tmp_path / "two.json")], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert a["status"] == "ok" and proc.returncode == 0, proc.stderr[-3000:]
    b = json.loads((Path(two.out) / "result.json").read_text())
    assert b["world_size"] == 2 and b["strategy"] == "fsdp"
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    assert b["peak_memory_bytes"] < a["peak_memory_bytes"]
    print(f"\n[gpu] 1B fsdp x2: val_loss {b['val_loss']:.6f} vs {a['val_loss']:.6f}; peak per rank "
          f"{b['peak_memory_bytes'] / 2 ** 30:.2f} GiB vs {a['peak_memory_bytes'] / 2 ** 30:.2f} GiB on one GPU")


def test_qlora_killed_and_resumed_on_cuda_ends_with_the_same_adapter(one_b, tmp_path):
    """A QLoRA run killed (SIGKILL) after its step-2 checkpoint and restarted ends with the uninterrupted run's
    adapter: the 4-bit base is rebuilt, LoRA and paged AdamW state come back from the checkpoint."""
    import signal
    import time

    from safetensors.torch import load_file

    from jobs import finetune
    folder, _ = one_b
    common = dict(quantization="nf4", checkpoint_every=2, max_steps=6)
    reference = finetune.run(_one_b_spec(folder, tmp_path / "reference", **common))
    spec = _one_b_spec(folder, tmp_path / "killed", **common)
    Path(spec.out).mkdir(parents=True)
    spec.to_json(tmp_path / "killed.json")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.finetune", "--spec", str(tmp_path / "killed.json")],
                            cwd=REPO, env={**os.environ, "LORA_HPO_MIN_STEP_S": "2"})
    deadline = time.monotonic() + 900
    while not list((Path(spec.out) / "checkpoints").glob("step-*.pt")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(spec.out) / "result.json").exists(), "killed too late to test a resume"
    resumed = finetune.run(spec)
    assert reference["status"] == resumed["status"] == "ok" and resumed["resumed_from_step"] >= 2
    a = load_file(str(tmp_path / "reference" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    gap = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"\n[gpu] 1B QLoRA resumed from step {resumed['resumed_from_step']}: max |adapter gap| {gap:.2e}")
    assert gap < 1e-5
