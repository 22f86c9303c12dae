"""The options that reproduce the authors' run (issue 23), each shown to change what it claims, on the tiny model:
trainable embeddings as run, fp32 weights under bf16 autocast, the optimizer-step budget, the validation batch,
eager attention, the slow (SentencePiece) tokenizer, MMLU cells as pandas read them; and decoding that means
what it says whatever the checkpoint's generation_config.json holds.

    .venv/bin/python -m pytest tests/test_paper_fidelity.py -q        # about two minutes on 2 loaded cores
    .venv/bin/python -m pytest tests/test_paper_fidelity.py -q -m unit
"""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from jobs import data as D
from jobs import finetune as F
from jobs.model import TrainingFailure, add_lora, add_pad_token, load_base, load_tokenizer, train_embeddings
from jobs.spec import DataSpec, FinetuneSpec, SpecError, preset

CPU = torch.device("cpu")


def tiny_spec(tmp_path, name="run", rows=50, **kw) -> FinetuneSpec:
    """The tiny preset on a 50-row mix (40 training rows, 16 per optimizer step: 2 steps per epoch)."""
    return preset("tiny", out=str(tmp_path / name), lr=1e-2, dropout=0.0, log_every=1,
                  data=DataSpec(total_rows=rows, cache_dir=str(tmp_path / "data")), **kw)


@pytest.fixture(scope="module")
def sentencepiece_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a SentencePiece tokenizer.model beside its tokenizer.json, as Llama-2's repository
    has both: trained here on the bundled data, Llama-like (byte fallback, no normalization, the tiny
    model's special-token ids), with fewer pieces than the model has embedding rows."""
    spm = pytest.importorskip("sentencepiece")
    lines = [v for path in sorted(D.ASSETS.glob("tiny_*.jsonl")) for line in path.read_text().splitlines()
             for v in json.loads(line).values() if isinstance(v, str) and v]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=1000,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                                   minloglevel=2)
    folder = tmp_path_factory.mktemp("spm") / "tiny-spm"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder


# ----------------------------------------------------------------------------------------------- the spec
@pytest.mark.unit
def test_the_as_run_options_are_validated_with_one_line_errors():
    for field, bad in (("trainable_embeddings", "all"), ("precision", "fp16"), ("attn_implementation", "flash"),
                       ("tokenizer", "rust"), ("eval_batch", 0), ("max_steps", True)):
        with pytest.raises(SpecError, match=f"^{field}={bad!r} is invalid: must be ") as err:
            FinetuneSpec(**{field: bad})
        assert "\n" not in str(err.value)
    spec = FinetuneSpec(trainable_embeddings="as_run", precision="fp32_autocast_bf16", attn_implementation="eager",
                        tokenizer="slow", eval_batch=20, max_steps=836)
    assert FinetuneSpec.from_dict(spec.to_dict()) == spec  # the spec.json a trial writes holds them
    assert (FinetuneSpec().trainable_embeddings, FinetuneSpec().precision, FinetuneSpec().tokenizer,
            FinetuneSpec().attn_implementation, FinetuneSpec().eval_batch) == ("none", "auto", "fast", "sdpa", None)


@pytest.mark.unit
def test_the_evaluation_options_are_validated_and_logged_as_protocol_tags():
    from evaluation.spec import EvaluationSpec, ProtocolError

    for field, bad in (("mmlu_cells", "csv"), ("attn_implementation", "flash"), ("tokenizer", "rust")):
        with pytest.raises(ProtocolError, match=f"^evaluation.{field}={bad!r} is invalid: choose one of "):
            EvaluationSpec(**{field: bad})
    protocol = EvaluationSpec(mmlu_cells="pandas", attn_implementation="eager", tokenizer="slow").protocol()
    assert (protocol["eval.protocol.mmlu_cells"], protocol["eval.protocol.attn_implementation"],
            protocol["eval.protocol.tokenizer"]) == ("pandas", "eager", "slow")
    with pytest.raises(ProtocolError, match="harness: instructeval only"):  # lm-eval loads its own model
        EvaluationSpec(harness="lm-eval", tasks="arc_easy", attn_implementation="eager")


# ----------------------------------------------------------------------------------------------- embeddings
def test_as_run_embeddings_train_at_the_searched_lr_and_only_lora_is_saved(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    frozen = F.set_up(tiny_spec(tmp_path), 0, 1, 0)
    lora = sum(p.numel() for p in frozen.trainable)
    hidden, vocab = 128, 1024  # the tiny model (jobs/tiny.py); untied input and output embeddings
    # no warmup: the first step (checkpointed) already runs at the searched lr
    spec = tiny_spec(tmp_path, "as-run", trainable_embeddings="as_run", max_steps=2, checkpoint_every=1,
                     warmup_ratio=0.0)
    as_run = F.set_up(spec, 0, 1, 0)
    assert sum(p.numel() for p in as_run.trainable) == lora + 2 * vocab * hidden
    assert {id(p) for p in as_run.optimizer.param_groups[0]["params"]} == {id(p) for p in as_run.trainable}
    assert as_run.scheduler.base_lrs == [spec.lr]  # one group: the embeddings train at the searched lr

    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    assert (result["trainable_params"], result["embedding_params_trained"]) == (lora, 2 * vocab * hidden)
    step1 = torch.load(tmp_path / "as-run" / "checkpoints" / "step-0000001.pt", weights_only=False)["adapter"]
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, original in (("base_model.model.model.embed_tokens.weight", "model.embed_tokens.weight"),
                           ("base_model.model.lm_head.weight", "lm_head.weight")):
        assert (step1[name] - base[original]).abs().max() > 1e-4, f"{name} did not move"
    saved = load_file(str(tmp_path / "as-run" / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # the scored adapter lacks the trained embeddings


def test_as_run_adds_the_pad_token_with_mean_rows_when_the_tokenizer_has_none(tiny_model_dir):
    tokenizer, model = load_base("tiny", CPU, torch.float32)
    assert add_pad_token(tokenizer) == 0  # the tiny tokenizer has <pad>: nothing added, as their script
    tokenizer.pad_token = None  # Llama-2's has none
    assert add_pad_token(tokenizer) == 1 and tokenizer.pad_token == "[PAD]" and len(tokenizer) == 1025
    model = add_lora(model, preset("tiny"))
    inner = model.get_base_model()
    old = [w.detach().clone() for w in (inner.get_input_embeddings().weight, inner.get_output_embeddings().weight)]
    assert train_embeddings(model, tokenizer) == 2 * 1025 * 128
    for weight, before in zip((inner.get_input_embeddings().weight, inner.get_output_embeddings().weight), old):
        assert weight.shape == (1025, 128) and weight.requires_grad
        assert torch.equal(weight[:1024], before)  # the old rows kept
        assert torch.allclose(weight[1024], before.mean(dim=0))  # the new one: their mean, as their script
    assert tokenizer("[PAD]", add_special_tokens=False)["input_ids"] == [1024]


# ----------------------------------------------------------------------------------------------- precision
def test_fp32_autocast_bf16_keeps_fp32_weights_and_runs_the_forward_in_bf16(tmp_path):
    seen = {}
    for precision in ("fp32", "fp32_autocast_bf16"):
        s = F.set_up(tiny_spec(tmp_path, precision=precision), 0, 1, 0)
        assert {p.dtype for p in s.model.parameters()} == {torch.float32}
        layer = s.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
        hook = layer.register_forward_hook(lambda m, i, o: seen.__setitem__(precision, o.dtype))
        with torch.no_grad(), s.autocast:
            s.loss_fn(**F.on_device(F.collate(s.train_set[:2], s.pad_id), CPU))
        hook.remove()
        assert s.as_run["autocast"] == (None if precision == "fp32" else "bfloat16")
    assert seen == {"fp32": torch.float32, "fp32_autocast_bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------- step budget
def test_max_steps_sets_the_number_of_optimizer_steps_past_the_epochs(tmp_path):
    spec = tiny_spec(tmp_path, epochs=1.0, max_steps=5)  # 1 epoch = 2 steps here; the budget is 5 steps
    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    assert (result["steps"], result["steps_per_epoch"], result["epochs_run"]) == (5, 2, 2.5)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in steps if "loss" in r]
    assert [r["step"] for r in trained] == [1, 2, 3, 4, 5] and [r["epoch"] for r in trained] == [0, 0, 1, 1, 2]


# ----------------------------------------------------------------------------------------------- validation batch
def test_eval_batch_sets_the_validation_batches_of_the_trainer_average(tiny_model_dir, tiny_tokenizer):
    """The authors' NOMAD run averaged batches of 20 validation rows, their TPE run batches of 4."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    rows = [{"instruction": f"Add {i} and {i}.", "context": "", "response": " ".join(["twice"] * (1 + 5 * (i % 7)))}
            for i in range(30)]
    examples, _ = D.tokenize(rows, tiny_tokenizer, 256)
    sizes = []
    hook = model.get_base_model().model.register_forward_hook(lambda m, i, o: sizes.append(o[0].shape[0]))
    args = (CPU, 0, 1, contextlib.nullcontext(), tiny_tokenizer.pad_token_id)
    spec = preset("tiny", per_device_batch=4, val_loss_average="batch")
    by_4 = F.validation_loss(F.ResponseLoss(model), examples, spec, *args)
    assert sizes == [4] * 7 + [2]
    sizes.clear()
    by_20 = F.validation_loss(F.ResponseLoss(model), examples, spec.replace(eval_batch=20), *args)
    assert sizes == [20, 10]
    hook.remove()
    with torch.no_grad():
        means = [(F.ResponseLoss(model)(**F.collate(examples[i:i + 20], tiny_tokenizer.pad_token_id)), n)
                 for i, n in ((0, 20), (20, 10))]
    assert by_20 == pytest.approx(sum((s / c).item() * n for (s, c), n in means) / 30, rel=1e-6)
    assert abs(by_20 - by_4) > 1e-4  # the figure moves with the batch, as the paper's did


# ----------------------------------------------------------------------------------------------- attention, tokenizer
def test_eager_attention_and_the_slow_tokenizer_are_what_the_model_runs_with(sentencepiece_model_dir, tmp_path):
    from evaluation import EvalError
    from evaluation.model import load

    tok, model = load_base("tiny", CPU, torch.float32)
    assert (model.config._attn_implementation, tok.is_fast) == ("sdpa", True)
    slow, model = load_base(str(sentencepiece_model_dir), CPU, torch.float32, "eager", "slow")
    assert model.config._attn_implementation == "eager" and not slow.is_fast
    assert type(slow).__name__ in ("SentencePieceTokenizer", "LlamaTokenizer")  # transformers 5 / 4.x
    ids = slow("Name a color.\n\n### Response:\nBlue", add_special_tokens=False)["input_ids"]
    assert ids != tok("Name a color.\n\n### Response:\nBlue", add_special_tokens=False)["input_ids"]
    assert slow.decode(ids) == "Name a color.\n\n### Response:\nBlue"
    with pytest.raises(TrainingFailure, match="tokenizer: slow needs .* tokenizer.model") as err:
        load_tokenizer(_tiny(), "slow")  # no tokenizer.model: nothing to load, a one-line error
    assert "\n" not in str(err.value)
    _, _, info = load(str(sentencepiece_model_dir), None, "cpu", "fp32", attn_implementation="eager",
                      tokenizer="slow")
    assert (info["attn_implementation"], info["tokenizer_class"]) == ("eager", type(slow).__name__)
    with pytest.raises(EvalError, match="tokenizer: slow needs"):
        load("tiny", None, "cpu", "fp32", tokenizer="slow")


def _tiny() -> str:
    from jobs.tiny import tiny_model_dir
    return str(tiny_model_dir())


@pytest.mark.slow
def test_a_fine_tune_as_the_authors_ran_it_records_every_choice(sentencepiece_model_dir, tmp_path):
    spec = tiny_spec(tmp_path, base_model=str(sentencepiece_model_dir), epochs=1.0, max_steps=3,
                     trainable_embeddings="as_run", precision="fp32_autocast_bf16", attn_implementation="eager",
                     tokenizer="slow", val_loss_average="batch", eval_batch=20, prompt_template="authors")
    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    assert {k: result[k] for k in ("steps", "epochs_run", "dtype", "autocast", "attn_implementation",
                                   "embedding_params_trained")} == {
        "steps": 3, "epochs_run": 1.5, "dtype": "float32", "autocast": "bfloat16", "attn_implementation": "eager",
        "embedding_params_trained": 2 * 1024 * 128}
    assert result["tokenizer_class"] in ("SentencePieceTokenizer", "LlamaTokenizer")
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["eval_batch"] == 20


# ----------------------------------------------------------------------------------------------- MMLU cells
def test_mmlu_cells_as_pandas_read_the_reference_csvs():  # pure, but importing pandas takes a second or more
    from evaluation.tasks import mmlu

    row = lambda q, choices, answer=0, subject="s": {"question": q, "subject": subject, "choices": choices,
                                                     "answer": answer}
    raw = {"dev": [row("Q1", ["None", "2", "0.50", "x"]), row("Q2", ["y", "NA", "3", "z"], 1),
                   row("Q5", ["e", "f", "g", "h"], 0, "t")],
           "test": [row("Q3", ["a", "2", "b", "None of these"], 2), row("Q4", ["a, b", "7", '"q"', "w"], 3, "t")]}
    read = mmlu.as_pandas_reads(raw)
    assert read["dev"][0]["choices"] == ["nan", "2.0", "0.5", "x"]  # NA strings -> nan; a column with a gap: floats
    assert read["dev"][1]["choices"] == ["y", "nan", "3.0", "z"]
    assert read["test"][0]["choices"] == ["a", "2", "b", "None of these"]  # an all-integer column stays "2"
    assert read["test"][1]["choices"] == ["a, b", "7", '"q"', "w"] and read["test"][1]["subject"] == "t"
    count = lambda prompts: [len(p) // 4 for p in prompts]
    text = mmlu.build(raw, count)[0].prompt
    pandas = mmlu.build(read, count)[0].prompt
    assert "\nA. None\nB. 2\nC. 0.50\n" in text and "\nA. nan\nB. 2.0\nC. 0.5\n" in pandas


# ----------------------------------------------------------------------------------------------- decoding
SAMPLING_FILE = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3}
PROMPTS = ["The capital of France is", "### Instruction:\nName a color.\n\n### Response:\n", "Two plus two is"]


@pytest.fixture(scope="module")
def sampling_checkpoint(tmp_path_factory, tiny_model_dir):
    """The tiny model re-saved with a generation_config.json that asks for sampling (as a re-saved Llama-2
    checkpoint's does), written by this transformers: the file generate() fills unset fields from."""
    from transformers import GenerationConfig

    folder = tmp_path_factory.mktemp("gen") / "tiny-sampling"
    shutil.copytree(tiny_model_dir, folder)
    GenerationConfig(**SAMPLING_FILE, bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    return folder


def test_greedy_stays_greedy_and_reference_follows_the_checkpoints_file(sampling_checkpoint, tiny_model_dir):
    from evaluation.generate import generate
    from evaluation.model import load
    from evaluation.runner import checkpoint_decoding, resolve_decoding
    from evaluation.spec import EvaluationSpec
    from evaluation.tasks import get_tasks

    plain, tokenizer, _ = load(str(tiny_model_dir), None, "cpu", "fp32", merge=False)
    model, _, _ = load(str(sampling_checkpoint), None, "cpu", "fp32", merge=False)
    assert {k: getattr(model.generation_config, k) for k in SAMPLING_FILE} == SAMPLING_FILE
    run = lambda m, seed=0, **decoding: generate(m, tokenizer, PROMPTS, 10, suppress_eos=True, seed=seed, **decoding)

    greedy = run(plain)
    assert [run(model, seed) for seed in (0, 1)] == [greedy] * 2  # the file neither samples nor penalizes

    mmlu = get_tasks("mmlu")[0]
    reference = resolve_decoding(EvaluationSpec(decoding="reference"), mmlu, checkpoint_decoding(model))
    assert reference == {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.3}
    assert resolve_decoding(EvaluationSpec(decoding="greedy"), mmlu, checkpoint_decoding(model)) == {"do_sample": False}
    explicit = dict(temperature=0.6, top_p=0.9, top_k=50, extra={"repetition_penalty": 1.3})
    followed = [run(model, seed, **explicit) for seed in (0, 1)]
    assert followed == [run(plain, seed, **explicit) for seed in (0, 1)]  # the file's settings, and only them
    assert any(out != greedy for out in followed)
    assert model.generation_config.do_sample is True  # the checkpoint's own config is left as it was


@pytest.mark.unit
def test_reference_takes_what_the_file_sets_and_refuses_beam_search():
    from evaluation import EvalError
    from evaluation.runner import resolve_decoding
    from evaluation.spec import EvaluationSpec
    from evaluation.tasks import get_tasks

    mmlu, humaneval = get_tasks("mmlu,humaneval")
    file = {"do_sample": None, "temperature": None, "top_p": None, "top_k": None, "num_beams": None,
            "repetition_penalty": 1.2, "no_repeat_ngram_size": 0}
    reference = EvaluationSpec(decoding="reference")
    assert resolve_decoding(reference, mmlu, file) == {"do_sample": False, "repetition_penalty": 1.2}
    assert resolve_decoding(reference, humaneval, file) == {"do_sample": True, "temperature": 0.1, "top_p": 1.0,
                                                            "top_k": 50, "repetition_penalty": 1.2}
    sampling = EvaluationSpec(decoding="sampling", temperature=0.7, seeds=[0])
    assert resolve_decoding(sampling, mmlu, file) == {"do_sample": True, "temperature": 0.7, "top_p": 1.0, "top_k": 0}
    with pytest.raises(EvalError, match="beam search \\(num_beams 4\\)"):
        resolve_decoding(reference, mmlu, {**file, "num_beams": 4})
