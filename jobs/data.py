"""Instruction data: load, unify, mix, split (once per study), format with the Alpaca template, tokenize.

    python -m jobs.data --preset tiny          # prepare the splits and print their folder and sizes

Sources are hub ids (`tatsu-lab/alpaca`, `databricks/databricks-dolly-15k`), local .json / .jsonl / .parquet
files, folders in the Hugging Face layout (`save_to_disk` output or a repository snapshot), or the bundled
sets (`bundled:tiny-alpaca`, `bundled:tiny-dolly`, `bundled:tiny-chat`). Columns are unified to instruction /
context / response (Alpaca's input/output are renamed); a row holding a conversation (`messages` of role/content,
or ShareGPT's `conversations` of from/value) becomes {"messages": [...]} (jobs/chat.py). The recipe:
  1. de-duplicate on the normalized (instruction, context) pair, or a conversation's non-assistant turns, within
     and across sources, so that no prompt can reach both splits (the paper's split sampled with replacement
     and leaked validation rows: ours not);
  2. draw each source's share of the mix without replacement with a seeded generator; the mix has
     `total_rows` rows, or the largest size the weights allow without replacement;
  3. shuffle the mix (seeded) and cut `val_fraction` of it off as the validation split.
The splits are written once under `cache_dir/<content hash>/` (atomically) and every evaluation of a study
reads the same files. This module is torch-free; tokenization needs a tokenizer object only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from jobs import chat
from jobs.spec import BUNDLED_PREFIX, DataSpec

ASSETS = Path(__file__).resolve().parent / "assets"
# tiny_chat.jsonl lives in assets/chat/: jobs/tiny.py pretrains the tiny model on assets/tiny_*.jsonl, and a new
# file there would change (and rebuild) that model
BUNDLED = {"tiny-alpaca": ASSETS / "tiny_alpaca.jsonl", "tiny-dolly": ASSETS / "tiny_dolly.jsonl",
           "tiny-chat": ASSETS / "chat" / "tiny_chat.jsonl"}
RENAMES = {"input": "context", "output": "response"}  # Alpaca's columns -> the unified schema

# The prompt templates (FinetuneSpec.prompt_template). "alpaca", the default: Stanford Alpaca's wording with
# the response on the line after its header (alpaca-lora's spelling): the newline makes the end of the prompt
# a token boundary for SentencePiece and byte-level BPE alike, so masking the first len(tokenize(prompt))
# tokens masks exactly the prompt. "authors": the paper authors' training script verbatim (its context header
# has four '#', and the response follows "### Response:" with no separator), for a token stream identical
# to theirs.
PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
PROMPT_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")
AUTHORS_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n#### Context:\n{context}\n\n### Response:")
AUTHORS_NO_CONTEXT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")
TEMPLATES = {"alpaca": (PROMPT_WITH_CONTEXT, PROMPT_NO_CONTEXT), "authors": (AUTHORS_WITH_CONTEXT, AUTHORS_NO_CONTEXT)}
IGNORE = -100  # label of tokens that carry no loss (the prompt)


class DataError(ValueError):
    """Missing or malformed data; the message names the source and the fix."""


def format_prompt(row: dict, template: str = "alpaca") -> str:
    with_context, no_context = TEMPLATES[template]
    if row.get("context"):
        return with_context.format(instruction=row["instruction"], context=row["context"])
    return no_context.format(instruction=row["instruction"])


# ----------------------------------------------------------------------------------------------- loading
def load_rows(name: str, split: str = "train") -> list[dict]:
    """Rows of one source in the unified schema {instruction, context, response}, or {messages} (a conversation)."""
    raw = _load_raw(name, split)
    rows = []
    for i, r in enumerate(raw):
        if not isinstance(r, dict):
            raise DataError(f"data source {name}: row {i} is not a mapping of columns: fix the data")
        try:
            turns = chat.conversation(r, f"data source {name}: row {i}")
        except chat.ChatError as e:
            raise DataError(str(e)) from None
        if turns is not None:
            rows.append({"messages": turns})
            continue
        r = {RENAMES.get(k, k): v for k, v in r.items()}
        missing = [c for c in ("instruction", "response") if c not in r]
        if missing:
            raise DataError(f"data source {name}: row {i} lacks column {missing[0]!r} (has {sorted(r)}): "
                            "rows need instruction and response (or Alpaca's output), context/input optional")
        if not isinstance(r["instruction"], str) or not isinstance(r["response"], str):
            raise DataError(f"data source {name}: row {i} has a non-text instruction or response: fix the data")
        rows.append({"instruction": r["instruction"], "context": r.get("context") or "", "response": r["response"]})
    if not rows:
        raise DataError(f"data source {name} holds no rows: check the path or split {split!r}")
    return rows


def _load_raw(name: str, split: str) -> list[dict]:
    if name.startswith(BUNDLED_PREFIX):
        key = name[len(BUNDLED_PREFIX):]
        if key not in BUNDLED:
            raise DataError(f"unknown bundled data set {name!r}: choose one of "
                            + ", ".join(BUNDLED_PREFIX + k for k in BUNDLED))
        return read_records(BUNDLED[key])
    path = Path(name).expanduser()
    if path.is_file():
        return read_records(path)
    if path.is_dir():
        return _read_folder(path, split)
    if name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".parquet")) or name.count("/") > 1:
        raise DataError(f"data source {name} does not exist: give an existing file or folder, or a hub id")
    return _read_hub(name, split)


def read_records(path: Path) -> list[dict]:
    """Rows of a .json (a list, or {"data": [...]}), .jsonl or .parquet file; DataError when unreadable."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).to_pylist()
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise DataError(f"data file {path}: expected a JSON list of rows")
            return data
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"data file {path} is malformed ({type(e).__name__}: {e}): fix or replace it") from None
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror or e}): check the file") from None
    except DataError:
        raise
    except Exception as e:  # pyarrow raises its own types for corrupt files
        raise DataError(f"data file {path} is malformed ({type(e).__name__}): fix or replace it") from None
    raise DataError(f"data file {path}: unsupported format {path.suffix!r}: use .json, .jsonl or .parquet")


def _read_folder(path: Path, split: str) -> list[dict]:
    """A `save_to_disk` folder, or a repository snapshot with data files (the hub's layout)."""
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"data folder {path} has no split {split!r} (has {sorted(ds)}): set split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path), split=split)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data folder {path} cannot be read as a data set ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}): use the Hugging Face layout") from None
    return ds.to_list()


def _read_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"data set {name!r} could not be loaded from the hub ({first[:160]}): "
                        "download it where the hub is reachable and give the local folder") from None


# ----------------------------------------------------------------------------------------------- splitting
def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def dedup(rows: list[dict], seen: set | None = None) -> list[dict]:
    """Keep the first row of each normalized (instruction, context) prompt, or of each conversation's
    non-assistant turns (jobs/chat.py dedup_key)."""
    seen = set() if seen is None else seen
    out = []
    for r in rows:
        key = chat.dedup_key(r["messages"]) if "messages" in r else (_norm(r["instruction"]), _norm(r["context"]))
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def mix_and_split(per_source: list[list[dict]], weights: list[float], spec: DataSpec) -> tuple[list, list]:
    """Seeded draw without replacement of each source's share, then a seeded shuffle and the val cut."""
    shares = [w / sum(weights) for w in weights]
    largest = int(min(len(rows) / s for rows, s in zip(per_source, shares)))
    total = spec.total_rows or largest
    if total > largest:
        raise DataError(f"data.total_rows={total} needs more rows than the sources hold without replacement "
                        f"(at most {largest} with these weights): lower total_rows or add data")
    counts = [int(round(total * s)) for s in shares]
    rng = random.Random(spec.seed)
    mixed = []
    for rows, n in zip(per_source, counts):
        mixed.extend(rows[i] for i in rng.sample(range(len(rows)), min(n, len(rows))))
    rng.shuffle(mixed)
    n_val = max(1, int(round(len(mixed) * spec.val_fraction)))
    if len(mixed) - n_val < 1:
        raise DataError(f"only {len(mixed)} rows after mixing: too few for a train and a validation split")
    return mixed[n_val:], mixed[:n_val]


def prepare_splits(spec: DataSpec) -> Path:
    """Write (once) and return the folder holding train.jsonl, val.jsonl and meta.json for this data spec."""
    seen: set = set()
    per_source = [dedup(load_rows(s.name, s.split), seen) for s in spec.sources]
    for s, rows in zip(spec.sources, per_source):
        if not rows:
            raise DataError(f"data source {s.name}: every row duplicates an earlier source's: remove the source")
    recipe = {k: v for k, v in asdict(spec).items() if k != "cache_dir"}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    for rows in per_source:
        for r in rows:
            digest.update(json.dumps(r, sort_keys=True).encode())
    folder = Path(spec.cache_dir or Path(os.environ.get("LORA_HPO_CACHE", Path.home() / ".cache" / "lora-hpo"))
                  / "data") / digest.hexdigest()[:16]
    if (folder / "meta.json").exists():
        return folder
    train, val = mix_and_split(per_source, [s.weight for s in spec.sources], spec)
    meta = {"recipe": recipe, "n_train": len(train), "n_val": len(val),
            "sources": {s.name: len(rows) for s, rows in zip(spec.sources, per_source)}}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        for name, rows in (("train", train), ("val", val)):
            (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "meta.json").exists():  # another job won the race: theirs is identical
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_split(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / f"{name}.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- tokenizing
def tokenize(rows: list[dict], tokenizer, max_seq_len: int,
             template: str = "alpaca") -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input_ids, labels) per row: BOS + tokenize(prompt + response) + EOS, loss on the tokens after the first
    1 + len(tokenize(prompt)) (the response) and on EOS - Stanford Alpaca's `preprocess`, as the authors ran it.

    Prompt and response are tokenized together, as the model sees them at inference: tokenized apart, a
    SentencePiece tokenizer (Llama's) would start the response with a word-start token that the joint text
    never produces. Sequences are cut at max_seq_len; a row whose response is cut away entirely carries no
    loss and is dropped (counted). Template "chat": the tokenizer's chat template, loss on every assistant turn
    (jobs/chat.py tokenize_chat)."""
    if template == "chat":
        try:
            return chat.tokenize_chat(rows, tokenizer, max_seq_len)
        except chat.ChatError as e:
            raise DataError(str(e)) from None
    if any("messages" in r for r in rows):
        raise DataError(f"the data holds conversations (messages), which the {template!r} prompt template cannot "
                        "render: set prompt_template: chat")
    prompts = [format_prompt(r, template) for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    joint = tokenizer([p + r["response"] for p, r in zip(prompts, rows)], add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out, dropped = [], 0
    for p, j in zip(prompt_ids, joint):
        ids = (bos + j + [tokenizer.eos_token_id])[:max_seq_len]
        masked = len(bos) + len(p)
        if len(ids) <= masked:
            dropped += 1
            continue
        out.append((ids, [IGNORE] * masked + ids[masked:]))
    return out, dropped


if __name__ == "__main__":
    import argparse

    from jobs.spec import preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    folder = prepare_splits(preset(parser.parse_args().preset).data)
    print(folder, json.loads((folder / "meta.json").read_text()))
