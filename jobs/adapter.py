"""Load a trained adapter as a usable model: a folder, an MLflow run artifact, or a registered model.

    from jobs.adapter import load_adapter
    model, tokenizer = load_adapter("models:/tiny-nomad-adapter@champion")   # base + LoRA, ready to generate

The base model is the one the adapter was trained on (PEFT records it in adapter_config.json; "tiny" is
the embedded model); pass `base=` to override. A path that holds no adapter is an error, never a silent
fallback to the base model.
"""
from __future__ import annotations

import json
from pathlib import Path


def resolve_adapter(ref: str, tracking_uri: str | None = None) -> Path:
    """A local adapter folder for a path, runs:/RUN_ID/PATH or models:/NAME@ALIAS (or /VERSION) reference,
    read from `tracking_uri` (default: $MLFLOW_TRACKING_URI, else the project's store: jobs/tracking_store.py)."""
    if ref.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        from jobs.tracking_store import download

        ref = download(ref, tracking_uri)
    folder = Path(ref).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{ref} holds no PEFT adapter (adapter_config.json missing): give an adapter folder")
    return folder


def load_adapter(ref: str, base: str | None = None, dtype=None, tracking_uri: str | None = None):
    """(PeftModel in eval mode, tokenizer) for the adapter `ref` applied to its base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_adapter(ref, tracking_uri)
    base = base or json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or base == "tiny" or (base.startswith("/") and not Path(base).exists() and "tiny-llama" in base):
        from jobs.tiny import tiny_model_dir
        base = str(tiny_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype) if dtype else \
        AutoModelForCausalLM.from_pretrained(base)
    model = PeftModel.from_pretrained(model, str(folder)).eval()
    return model, tokenizer
