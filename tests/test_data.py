"""The data pipeline: loading from every kind of source, the leak-free seeded split, the exact masking."""
import json

import pytest

from jobs import data as D
from jobs.spec import DataSource, DataSpec


def _spec(tmp_path, **kw):
    return DataSpec(cache_dir=str(tmp_path / "cache"), **kw)


def test_bundled_sets_have_the_papers_schemas_and_enough_rows():
    alpaca, dolly = D._load_raw("bundled:tiny-alpaca", "train"), D._load_raw("bundled:tiny-dolly", "train")
    assert set(alpaca[0]) == {"instruction", "input", "output"}
    assert {"instruction", "context", "response", "category"} <= set(dolly[0])
    assert len(alpaca) + len(dolly) >= 1000
    assert set(D.load_rows("bundled:tiny-alpaca")[0]) == {"instruction", "context", "response"}


def test_split_is_seeded_leak_free_and_mixed_70_30(tmp_path):
    folder = D.prepare_splits(_spec(tmp_path))
    train, val = D.read_split(folder, "train"), D.read_split(folder, "val")
    key = lambda r: (D._norm(r["instruction"]), D._norm(r["context"]))  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in val}, "a prompt is in both splits"
    assert len({key(r) for r in train + val}) == len(train + val), "sampled with replacement"
    assert len(val) == pytest.approx(0.2 * (len(train) + len(val)), abs=1)
    meta = json.loads((folder / "meta.json").read_text())
    dolly = sum(1 for r in train + val if r["context"] and r["instruction"] in {
        "Who is mentioned in the text?", "Is the sentiment of this review positive or negative?",
        "Which is heavier?"} or r["instruction"].startswith("What color is the"))
    assert dolly / (len(train) + len(val)) == pytest.approx(0.3, abs=0.01)
    assert meta["n_train"] == len(train)
    # the same spec gives the same folder and files; another seed gives another split
    assert D.prepare_splits(_spec(tmp_path)) == folder
    other = D.prepare_splits(_spec(tmp_path, seed=7))
    assert other != folder and D.read_split(other, "val") != val


def test_duplicates_across_sources_never_reach_both_splits(tmp_path):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(100)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # b repeats every prompt of a with other whitespace and case, and another response
    b.write_text(json.dumps([{"instruction": f"  say   {i}. ", "context": "", "response": "x"} for i in range(100)]
                            + [{"instruction": f"Other {i}", "context": "", "response": "y"} for i in range(50)]))
    folder = D.prepare_splits(_spec(tmp_path, sources=[DataSource(str(a), 0.5), DataSource(str(b), 0.5)]))
    all_rows = D.read_split(folder, "train") + D.read_split(folder, "val")
    prompts = [D._norm(r["instruction"]) for r in all_rows]
    assert len(prompts) == len(set(prompts))
    assert len(all_rows) == 100  # 50 unique rows left in b: the mix is limited to 2 x 50 without replacement


def test_parquet_and_hf_layout_folders_load(tmp_path):
    import datasets

    rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}"} for i in range(20)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    snapshot = tmp_path / "snapshot" / "data"
    snapshot.mkdir(parents=True)
    ds.to_json(str(snapshot / "train-00000.jsonl"))
    for source in (tmp_path / "d.parquet", tmp_path / "saved", tmp_path / "snapshot"):
        assert D.load_rows(str(source)) == rows


@pytest.mark.parametrize("content,fix", [
    ("{not json", "malformed"),
    ('[{"instruction": "x"}]', "lacks column 'response'"),
    ("[]", "holds no rows"),
])
def test_malformed_data_names_the_problem(tmp_path, content, fix):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(D.DataError, match=fix):
        D.load_rows(str(path))


def test_missing_sources_and_unreachable_hub_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(D.DataError, match="unknown bundled"):
        D.load_rows("bundled:nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(D.DataError, match="could not be loaded from the hub"):
        D.load_rows("tatsu-lab/alpaca")


def test_masking_is_exact_and_eos_is_a_target(tiny_tokenizer):
    rows = [{"instruction": "Name a color.", "context": "", "response": "Blue."},
            {"instruction": "Who is there?", "context": "Alice is there.", "response": "Alice"}]
    (ids0, labels0), (ids1, labels1) = D.tokenize(rows, tiny_tokenizer, 512)[0]
    for row, ids, labels in ((rows[0], ids0, labels0), (rows[1], ids1, labels1)):
        prompt = [tiny_tokenizer.bos_token_id] + tiny_tokenizer(D.format_prompt(row), add_special_tokens=False)["input_ids"]
        response = tiny_tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert ids == prompt + response + [tiny_tokenizer.eos_token_id]
        assert labels == [D.IGNORE] * len(prompt) + response + [tiny_tokenizer.eos_token_id]
        assert tiny_tokenizer.decode([t for t in labels if t != D.IGNORE][:-1]) == row["response"]
    assert "### Input:\nAlice is there." in D.format_prompt(rows[1])
    assert "### Input" not in D.format_prompt(rows[0])


def test_truncation_keeps_prompt_first_and_drops_rows_without_response(tiny_tokenizer):
    row = {"instruction": "word " * 50, "context": "", "response": "the answer is here"}
    examples, dropped = D.tokenize([row], tiny_tokenizer, 20)
    assert examples == [] and dropped == 1
    prompt_len = 1 + len(tiny_tokenizer(D.format_prompt(row), add_special_tokens=False)["input_ids"])
    examples, dropped = D.tokenize([row], tiny_tokenizer, prompt_len + 2)
    ids, labels = examples[0]
    assert len(ids) == prompt_len + 2 and dropped == 0
    assert labels[:prompt_len] == [D.IGNORE] * prompt_len and D.IGNORE not in labels[prompt_len:]


def sentencepiece_tokenizer(texts):
    """A small SentencePiece-style tokenizer built offline, behaving as Llama's: a Metaspace pre-tokenizer
    (a word-start marker on words after a space and on the text's first word) and newlines as tokens of their
    own that never merge with a neighbour (Llama's byte-fallback <0x0A>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                                 pre_tokenizers.Metaspace(prepend_scheme="first")])
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


SP_ROWS = [{"instruction": "What is the capital of France?", "context": "", "response": "Paris is the capital."},
           {"instruction": "Who wrote it?", "context": "Hamlet was written by Shakespeare.",
            "response": "Shakespeare wrote Hamlet."}]


@pytest.mark.parametrize("template", ["alpaca", "authors"])
def test_training_ids_are_the_joint_tokenization_and_the_mask_starts_at_the_response(template):
    tok = sentencepiece_tokenizer([D.format_prompt(r, t) + r["response"] for r in SP_ROWS
                                   for t in ("alpaca", "authors")] * 20)
    examples, dropped = D.tokenize(SP_ROWS, tok, 512, template)
    assert dropped == 0
    for row, (ids, labels) in zip(SP_ROWS, examples):
        prompt = D.format_prompt(row, template)
        joint = tok(prompt + row["response"], add_special_tokens=False)["input_ids"]
        assert ids == [tok.bos_token_id] + joint + [tok.eos_token_id]  # Alpaca's preprocess: one text
        start = 1 + len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert labels == [D.IGNORE] * start + ids[start:]  # Alpaca's rule: mask len(tokenize(prompt)) tokens
        if template == "authors":
            continue  # "### Response:" + response has no separator: the two may merge into one token there
        # The default template ends the prompt with a newline, its own token: the mask ends exactly there.
        assert ids[:start] == [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids[start:-1]) == row["response"]  # the loss is on exactly the response, then EOS
        # Tokenized apart (the former recipe), the response would start with a word-start marker that the
        # joint text never has: the model would learn sequences it never sees at inference.
        alone = tok(row["response"], add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(alone)[0].startswith("\u2581")
        assert alone != ids[start:-1]


def test_the_two_templates_are_the_documented_texts():
    row = {"instruction": "Who?", "context": "Alice.", "response": "x"}
    head = ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\nWho?\n\n")
    assert D.format_prompt(row) == head + "### Input:\nAlice.\n\n### Response:\n"
    assert D.format_prompt(row, "authors") == head + "#### Context:\nAlice.\n\n### Response:"  # their script
    assert D.format_prompt({**row, "context": ""}, "authors").endswith("### Instruction:\nWho?\n\n### Response:")
