"""The job's contract: a serializable spec in, a result out (torch-free: the orchestrator imports this).

    python -m jobs.finetune --spec spec.json        # rerun any trial by hand from its written spec

A `FinetuneSpec` holds everything one LoRA fine-tune needs; `preset("tiny")` is the embedded default and
`preset("paper")` the paper's setting (Llama-2-7b-hf, 70% Alpaca / 30% Dolly, 2 epochs, effective batch 128).
Validation lives in `__post_init__`: a bad value raises `SpecError` naming the field, the value and the fix.
Note that dropout = 1 is valid (it is in the paper's space): LoRA's input is then always zeroed, the adapter
receives no gradient and the result is the base model's loss.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TINY_MODEL = "tiny"  # the embedded base model, built and cached on first use (jobs/tiny.py)
TINY_CHAT_MODEL = "tiny-chat"  # the same model, its tokenizer given a chat template (jobs/tiny.py)
# target_modules by name: PEFT's "all-linear" (every linear layer but the output head), and "attention" (the
# linear layers of the attention blocks, whatever the architecture calls them: jobs/model.py)
TARGET_SETS = ("all-linear", "attention")
TEMPLATES = ("alpaca", "authors", "chat")  # jobs/data.py TEMPLATES; "chat": the tokenizer's own (jobs/chat.py)
VAL_LOSS_AVERAGES = ("token", "batch")
# The authors' run, option by option (evaluation/PROTOCOL.md, "Training recipe"): the project's default first.
PRECISIONS = ("auto", "bf16", "fp32", "fp32_autocast_bf16")
TRAINABLE_EMBEDDINGS = ("none", "as_run")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
TOKENIZERS = ("fast", "slow")
BUNDLED_PREFIX = "bundled:"  # bundled data sets: bundled:tiny-alpaca, bundled:tiny-dolly, bundled:tiny-chat


class SpecError(ValueError):
    """A spec value is invalid; the message names the field, the bad value and the fix."""


@dataclass
class DataSource:
    """One instruction data set and its share of the mix."""

    # hub id (tatsu-lab/alpaca), local file (.json/.jsonl/.parquet), HF-layout folder, or bundled:NAME. Rows are
    # instructions (instruction/context/response, or Alpaca's input/output) or conversations (`messages` of
    # role/content, or ShareGPT's `conversations` of from/value): those need prompt_template "chat".
    name: str
    weight: float = 1.0  # share of the mixed set; weights are normalized over the sources
    split: str = "train"  # which split of a hub data set or HF-layout folder to read

    def __post_init__(self):
        if not self.name:
            raise SpecError("data.sources[].name is empty: give a hub id, a local path or bundled:tiny-alpaca")
        if not self.weight > 0:
            raise SpecError(f"data.sources[{self.name}].weight={self.weight!r} must be > 0: give a positive share")


@dataclass
class DataSpec:
    """How the train/validation splits are built (seeded, without replacement, de-duplicated, leak-free)."""

    sources: list[DataSource] = field(default_factory=lambda: [
        DataSource(BUNDLED_PREFIX + "tiny-alpaca", 0.7), DataSource(BUNDLED_PREFIX + "tiny-dolly", 0.3)])
    val_fraction: float = 0.2
    # Rows in the mix; None takes the largest mix the weights allow without replacement.
    total_rows: int | None = None
    seed: int = 42
    # Where the prepared splits are written once, keyed by a content hash, and reused by every evaluation of
    # a study. None: $LORA_HPO_CACHE/data (default ~/.cache/lora-hpo/data).
    cache_dir: str | None = None

    def __post_init__(self):
        self.sources = [s if isinstance(s, DataSource) else DataSource(**_known(DataSource, s, "data.sources[]"))
                        for s in self.sources]
        if not self.sources:
            raise SpecError("data.sources is empty: list at least one data set")
        if not 0 < self.val_fraction < 1:
            raise SpecError(f"data.val_fraction={self.val_fraction!r} must be in (0, 1): e.g. 0.2")
        if self.total_rows is not None and self.total_rows < 2:
            raise SpecError(f"data.total_rows={self.total_rows!r} must be >= 2 or null (use all rows the mix allows)")


@dataclass
class FinetuneSpec:
    """One LoRA instruction-tuning run: base model, data, LoRA and training settings, output folder."""

    out: str = "runs/finetune"
    base_model: str = TINY_MODEL  # "tiny", a hub id (meta-llama/Llama-2-7b-hf) or a local HF-layout folder
    data: DataSpec = field(default_factory=DataSpec)
    # LoRA: the four searched hyperparameters, and where the adapters go
    r: int = 8
    alpha: float = 32
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lr: float = 1e-5
    # training
    epochs: float = 2.0
    # Optimizer steps; overrides epochs when set (the data plan then goes on into further epochs). The paper's
    # run took 836 steps at 2 epochs of its 53.6k leaky rows; 2 epochs of the leak-free set are ~620.
    max_steps: int | None = None
    per_device_batch: int = 4  # examples per micro-batch (length-grouped, right-padded)
    grad_accum: int = 8  # micro-batches per optimizer step (per device)
    # Length grouping. 0 (default): each optimizer step is a uniformly random sample, split into
    # micro-batches by length (less padding, same optimization). N > 0: HF-style group_by_length, sorting
    # within windows of N micro-batches: less padding still, but micro-batches of one length are often of
    # one kind of task; on the bundled data N=16 cost ~7% validation loss (bench/finetune_throughput.py).
    group_window: int = 0
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # auto: bf16 weights + tf32 on GPU, fp32 on CPU; bf16; fp32; fp32_autocast_bf16: fp32 weights, forward
    # passes under bf16 autocast (+ tf32 on GPU) - the authors' HF Trainer with --bf16 True, on a CPU too.
    precision: str = "auto"
    # "none": only the LoRA weights train. "as_run": the authors' script as it ran on Llama-2 (a [PAD] token
    # added when the tokenizer has none, embeddings resized, new rows = the mean of the old) with the
    # transformers of 2023, whose resize left embed_tokens and lm_head trainable: they train at the searched lr,
    # but only the LoRA weights are saved (and scored). A defect of theirs, hence off by default.
    trainable_embeddings: str = "none"
    attn_implementation: str = "sdpa"  # or "eager": the attention Llama ran with in 2023 (the authors')
    tokenizer: str = "fast"  # or "slow": the SentencePiece tokenizer (use_fast=False, the authors'; needs sentencepiece)
    max_seq_len: int = 512
    seed: int = 42
    # Prompt template (jobs/data.py): "alpaca" (Stanford Alpaca's wording, "### Input:", response on its own
    # line) or "authors" (the paper authors' script verbatim: "#### Context:", no newline after the header).
    prompt_template: str = "alpaca"
    # How the validation loss averages. "token": the mean cross-entropy over every response token of the split
    # (a property of the model alone). "batch": the HF Trainer's (the paper's) - each batch of per_device_batch
    # consecutive examples gets its token mean, and the batches are averaged weighted by their example count,
    # so the figure also depends on the batch size and the order of the split.
    val_loss_average: str = "token"
    # Validation rows per batch and device (None: per_device_batch). Only speed under "token"; under "batch" it
    # changes the figure: the authors' NOMAD run used 20 (bbo2/eval.py), their TPE run 4 (nni/step.py).
    eval_batch: int | None = None
    # validation loss at the end, and every eval_every optimizer steps if > 0 (logged to metrics.jsonl)
    eval_every: int = 0
    eval_before: bool = False  # also measure the untrained (base model) validation loss, as val_loss_before
    # Intermediate validation at these fractions of training (for pruning): at the first step past each, an
    # exact token-weighted pass over `eval_subset` examples of the validation split (the same ones for every
    # trial of a study: the first N of a seeded shuffle), logged as {"step", "fraction", "val_loss", "subset"}.
    eval_fractions: list[float] = field(default_factory=list)
    eval_subset: int | None = None  # None: the whole validation split
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = none
    # Seconds between checkpoints (0 = none): bounds the work a hard kill (node failure, SIGKILL) loses. A job
    # told to stop (SIGTERM, or USR2 before its time limit) always saves its last finished step first.
    checkpoint_every_s: float = 0.0
    log_every: int = 10  # flush per-step metrics every N steps (fewer host syncs)
    keep_checkpoints: int = 1
    # How the base model is held (jobs/strategies.py; "which strategy when" in examples/README.md).
    # strategy "ddp": every rank holds the whole base model (DistributedDataParallel when world > 1);
    # "fsdp": the frozen base and the LoRA weights are sharded across all ranks of all nodes (FSDP2).
    strategy: str = "ddp"
    # null: the base in `precision`; "nf4": QLoRA, a 4-bit NormalFloat base (bitsandbytes) computed in bf16 on
    # GPU (fp32 on CPU), LoRA weights and norms in fp32 (peft's prepare_model_for_kbit_training).
    quantization: str | None = None
    double_quant: bool = True  # nf4 only: quantize the quantization constants too (QLoRA's ~0.4 bit/param saved)
    # Recompute each decoder layer's activations in the backward pass: activations of one layer instead of all
    # of them held, for ~30% more compute.
    gradient_checkpointing: bool = False
    # "auto": torch AdamW (fused on GPU), or bitsandbytes' paged AdamW with nf4 on GPU (QLoRA's); or adamw,
    # adamw_8bit, paged_adamw, paged_adamw_8bit (bitsandbytes; ddp only: fsdp shards the state already).
    optimizer: str = "auto"
    # --- the modern recipe (issue 22); every default keeps the paper's recipe unchanged
    use_rslora: bool = False  # rank-stabilized LoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r
    use_dora: bool = False  # DoRA: weight-decomposed LoRA (a trained magnitude per output feature besides A, B)
    # LoRA alpha as a multiple of r: when set, alpha = alpha_ratio x r (so a search over r keeps alpha / r).
    alpha_ratio: float | None = None
    # Examples per optimizer step over all ranks: when set, grad_accum = effective_batch / (per_device_batch x
    # ranks): set here for one rank, and divided by the ranks by the job once it knows them (with_world), so one
    # value serves any GPU count.
    effective_batch: int | None = None
    # prompt_template "chat": the tokenizer's own chat template renders the conversations, unless this gives
    # one (a Jinja string, or the path of a .jinja file): for a base model whose tokenizer has none.
    chat_template: str | None = None

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataSpec(**_known(DataSpec, self.data, "data"))
        checks = [
            ("r", isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "an integer >= 1"),
            ("alpha", _num(self.alpha) and self.alpha > 0, "a number > 0"),
            ("dropout", _num(self.dropout) and 0 <= self.dropout <= 1, "a number in [0, 1]"),
            ("lr", _num(self.lr) and 0 < self.lr <= 1, "a number in (0, 1] (larger learning rates only diverge)"),
            ("epochs", _num(self.epochs) and self.epochs > 0, "a number > 0"),
            ("max_steps", self.max_steps is None or (isinstance(self.max_steps, int) and not isinstance(
                self.max_steps, bool) and self.max_steps >= 1),
             "an integer >= 1 or null"),
            ("per_device_batch", isinstance(self.per_device_batch, int) and self.per_device_batch >= 1, "an integer >= 1"),
            ("grad_accum", isinstance(self.grad_accum, int) and self.grad_accum >= 1, "an integer >= 1"),
            ("warmup_ratio", _num(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "a number in [0, 1)"),
            ("weight_decay", _num(self.weight_decay) and self.weight_decay >= 0, "a number >= 0"),
            ("max_grad_norm", _num(self.max_grad_norm) and self.max_grad_norm > 0, "a number > 0"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("trainable_embeddings", self.trainable_embeddings in TRAINABLE_EMBEDDINGS,
             f"one of {', '.join(TRAINABLE_EMBEDDINGS)}"),
            ("attn_implementation", self.attn_implementation in ATTN_IMPLEMENTATIONS,
             f"one of {', '.join(ATTN_IMPLEMENTATIONS)}"),
            ("tokenizer", self.tokenizer in TOKENIZERS, f"one of {', '.join(TOKENIZERS)}"),
            ("eval_batch", self.eval_batch is None or (isinstance(self.eval_batch, int) and not isinstance(
                self.eval_batch, bool) and self.eval_batch >= 1), "an integer >= 1 or null (= per_device_batch)"),
            ("prompt_template", self.prompt_template in TEMPLATES, f"one of {', '.join(TEMPLATES)}"),
            ("val_loss_average", self.val_loss_average in VAL_LOSS_AVERAGES, f"one of {', '.join(VAL_LOSS_AVERAGES)}"),
            ("max_seq_len", isinstance(self.max_seq_len, int) and self.max_seq_len >= 8, "an integer >= 8"),
            ("target_modules", self.target_modules in TARGET_SETS or (
                isinstance(self.target_modules, list) and bool(self.target_modules)
                and all(isinstance(m, str) and m for m in self.target_modules)),
             f"a non-empty list of module names, e.g. [q_proj, v_proj], or one of {', '.join(TARGET_SETS)}"),
            ("out", bool(self.out), "an output folder"),
        ]
        for name, ok, fix in checks:
            if not ok:
                raise SpecError(f"{name}={getattr(self, name)!r} is invalid: must be {fix}")
        if not isinstance(self.eval_fractions, (list, tuple)) or not all(
                _num(f) and 0 < f < 1 for f in self.eval_fractions):
            raise SpecError(f"eval_fractions={self.eval_fractions!r} is invalid: must be a list of fractions in (0, 1)")
        self.eval_fractions = sorted(float(f) for f in self.eval_fractions)
        if self.eval_subset is not None and (isinstance(self.eval_subset, bool) or not isinstance(
                self.eval_subset, int) or self.eval_subset < 1):
            raise SpecError(f"eval_subset={self.eval_subset!r} is invalid: must be a number of examples >= 1, or null")
        if not (_num(self.checkpoint_every_s) and self.checkpoint_every_s >= 0):
            raise SpecError(f"checkpoint_every_s={self.checkpoint_every_s!r} is invalid: must be seconds >= 0")
        for name in ("eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "group_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (1 if name == "log_every" else 0):
                raise SpecError(f"{name}={getattr(self, name)!r} is invalid: must be a non-negative integer")
        _check_strategy(self)
        self._check_modern()

    def _check_modern(self) -> None:
        """The fields of the modern recipe; alpha follows alpha_ratio when that is set."""
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"{name}={getattr(self, name)!r} is invalid: must be true or false")
        if self.alpha_ratio is not None:
            if not (_num(self.alpha_ratio) and self.alpha_ratio > 0):
                raise SpecError(f"alpha_ratio={self.alpha_ratio!r} is invalid: must be a number > 0 (alpha / r) or null")
            self.alpha = self.alpha_ratio * self.r
        if self.effective_batch is not None and (isinstance(self.effective_batch, bool) or not isinstance(
                self.effective_batch, int) or self.effective_batch < 1 or self.effective_batch % self.per_device_batch):
            raise SpecError(f"effective_batch={self.effective_batch!r} is invalid: must be a multiple of "
                            f"per_device_batch={self.per_device_batch} (or null: per_device_batch x grad_accum)")
        if self.effective_batch is not None:
            self.grad_accum = self.effective_batch // self.per_device_batch
        if self.chat_template is not None and (not isinstance(self.chat_template, str) or not self.chat_template):
            raise SpecError(f"chat_template={self.chat_template!r} is invalid: a Jinja template, a .jinja path or null")
        if self.chat_template is not None and self.prompt_template != "chat":
            raise SpecError("chat_template is set but prompt_template is "
                            f"{self.prompt_template!r}: set prompt_template: chat (or drop chat_template)")

    # --- serialization: the spec is written next to the job's outputs so any trial can be rerun by hand
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FinetuneSpec":
        return cls(**_known(cls, d, "spec"))

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "FinetuneSpec":
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SpecError(f"spec file {path} does not exist: give the path of a spec.json") from None
        except json.JSONDecodeError as e:
            raise SpecError(f"spec file {path} is not valid JSON ({e.msg}, line {e.lineno}): fix the file") from None
        if not isinstance(d, dict):
            raise SpecError(f"spec file {path} must hold a JSON object of spec fields")
        return cls.from_dict(d)

    def replace(self, **changes) -> "FinetuneSpec":
        return FinetuneSpec.from_dict({**self.to_dict(), **changes})

    def with_world(self, world: int) -> "FinetuneSpec":
        """This spec for `world` ranks: grad_accum derived from effective_batch (unchanged when that is null)."""
        if self.effective_batch is None:
            return self
        per_step = self.per_device_batch * world
        if self.effective_batch % per_step:
            raise SpecError(f"effective_batch={self.effective_batch} is not a multiple of per_device_batch x ranks "
                            f"= {self.per_device_batch} x {world}: pick a multiple of {per_step}")
        ranked = copy.copy(self)  # not dataclasses.replace: __post_init__ would set the one-rank value again
        ranked.grad_accum = self.effective_batch // per_step
        return ranked


STRATEGIES = ("ddp", "fsdp")
QUANTIZATIONS = (None, "nf4")
OPTIMIZERS = ("auto", "adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit")


def _check_strategy(spec: FinetuneSpec) -> None:
    """The scale options (strategy, quantization, double_quant, gradient_checkpointing, optimizer)."""
    if spec.strategy not in STRATEGIES:
        raise SpecError(f"strategy={spec.strategy!r} is invalid: must be ddp (every rank holds the base model) "
                        "or fsdp (the base model sharded across ranks)")
    if spec.quantization not in QUANTIZATIONS:
        raise SpecError(f"quantization={spec.quantization!r} is invalid: must be null or nf4 (QLoRA's 4-bit base)")
    for name in ("double_quant", "gradient_checkpointing"):
        if not isinstance(getattr(spec, name), bool):
            raise SpecError(f"{name}={getattr(spec, name)!r} is invalid: must be true or false")
    if spec.optimizer not in OPTIMIZERS:
        raise SpecError(f"optimizer={spec.optimizer!r} is invalid: must be one of {', '.join(OPTIMIZERS)}")
    if spec.strategy == "fsdp" and spec.quantization:
        raise SpecError(f"strategy=fsdp with quantization={spec.quantization} is not supported: bitsandbytes keeps "
                        "a 4-bit weight's scales outside the tensor FSDP shards; use strategy ddp (each GPU holds "
                        "the 4-bit base) or quantization null")
    if spec.strategy == "fsdp" and spec.optimizer not in ("auto", "adamw"):
        raise SpecError(f"optimizer={spec.optimizer} with strategy=fsdp is not supported: FSDP already shards the "
                        "optimizer state across ranks; use adamw")
    if getattr(spec, "trainable_embeddings", "none") == "as_run" and (spec.strategy == "fsdp" or spec.quantization):
        raise SpecError("trainable_embeddings=as_run reproduces the paper's single-GPU-per-rank run: it needs "
                        "strategy ddp and quantization null (the resized embeddings train whole on every rank)")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _known(cls, d: dict, where: str) -> dict:
    """Reject unknown keys with the list of valid ones (a typo must not be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}: valid keys are {', '.join(sorted(names))}")
    return dict(d)


PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: tiny Llama built locally, bundled synthetic Alpaca/Dolly-shaped data, CPU seconds.
    "tiny": dict(base_model=TINY_MODEL, epochs=2.0, per_device_batch=8, grad_accum=2, max_seq_len=256,
                 log_every=5),
    # The paper: Llama-2-7b-hf, 70% Alpaca / 30% Dolly, 80/20, seq 512, 4 x 8 x 4 GPUs = 128, 2 epochs.
    "paper": dict(base_model="meta-llama/Llama-2-7b-hf",
                  data=dict(sources=[dict(name="tatsu-lab/alpaca", weight=0.7),
                                     dict(name="databricks/databricks-dolly-15k", weight=0.3)]),
                  epochs=2.0, per_device_batch=4, grad_accum=8, max_seq_len=512, warmup_ratio=0.03,
                  weight_decay=0.0, precision="auto", r=8, alpha=32, dropout=0.1, lr=1e-5,
                  eval_every=0, checkpoint_every=50, checkpoint_every_s=1800.0, log_every=10),
}


def preset(name: str, **overrides) -> FinetuneSpec:
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return FinetuneSpec.from_dict({**PRESETS[name], **overrides})
