"""Chat data: conversations rendered with the tokenizer's chat template, loss on exactly the assistant turns."""
import copy
import json

import pytest

from jobs import chat
from jobs import data as D
from jobs import finetune as F
from jobs.spec import DataSource, DataSpec, preset

# Two templates in the shape of widely used ones, without `{% generation %}` blocks (as shipped models have none):
# ChatML (Qwen) and Llama 3's header style. Their end-of-turn markers are plain text for the tiny vocabulary.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
          "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    from jobs.tiny import tiny_chat_model_dir
    return AutoTokenizer.from_pretrained(tiny_chat_model_dir())


@pytest.fixture(scope="module")
def conversations():
    rows = D.load_rows("bundled:tiny-chat")
    assert all("messages" in r for r in rows)
    return rows


def _runs(labels):
    """Contiguous runs of labelled positions: [(start, end), ...]."""
    runs, start = [], None
    for i, t in enumerate(labels + [D.IGNORE]):
        if t != D.IGNORE and start is None:
            start = i
        elif t == D.IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_mask_is_hfs_generation_mask_on_every_multi_turn_conversation(chat_tokenizer, conversations):
    """Independent check: HF's return_assistant_tokens_mask (from the template's {% generation %} blocks) gives
    the same tokens as the incremental rendering, on every bundled conversation (up to 3 assistant turns)."""
    examples, dropped = D.tokenize(conversations, chat_tokenizer, 4096, "chat")
    assert dropped == 0 and len(examples) == len(conversations)
    turns = [sum(t["role"] == "assistant" for t in r["messages"]) for r in conversations]
    assert max(turns) == 3 and sum(t > 1 for t in turns) > 300
    for row, (ids, labels), n in zip(conversations, examples, turns):
        hf = chat_tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        assert hf["input_ids"] == ids
        assert [int(t != D.IGNORE) for t in labels] == list(hf["assistant_masks"])
        assert len(_runs(labels)) == n, "one labelled run per assistant turn"
        assert all(t in (D.IGNORE, i) for t, i in zip(labels, ids))


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_mask_covers_exactly_each_assistant_turn_and_its_end_of_turn(chat_tokenizer, conversations, template):
    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = {"chatml": CHATML, "llama3": LLAMA3}[template]
    rows = [r for r in conversations if sum(t["role"] == "assistant" for t in r["messages"]) >= 2][:100]
    examples, _ = D.tokenize(rows, tok, 4096, "chat")
    for row, (ids, labels) in zip(rows, examples):
        expected = [t["content"] + END_OF_TURN[template] for t in row["messages"] if t["role"] == "assistant"]
        assert [tok.decode(ids[a:b]) for a, b in _runs(labels)] == expected
        # everything else (system and user turns, role headers, separators) carries no loss
        assert tok.decode([i for i, t in zip(ids, labels) if t == D.IGNORE]).count("<|") > len(expected)


def test_truncation_keeps_partial_answers_and_drops_conversations_left_without_one(chat_tokenizer):
    long_user = "Remember these words: " + ", ".join(["apple", "river", "table"] * 30) + "."
    rows = [{"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "Noted."}]},
            {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                          {"role": "assistant", "content": "2 plus 2 equals 4. " * 20}]}]
    full, dropped = D.tokenize(rows, chat_tokenizer, 4096, "chat")
    assert dropped == 0
    cut = len(full[1][0]) // 2
    assert len(full[0][0]) > cut > full[1][1].index(next(t for t in full[1][1] if t != D.IGNORE)) + 2
    examples, dropped = D.tokenize(rows, chat_tokenizer, cut, "chat")
    assert dropped == 1 and len(examples) == 1
    ids, labels = examples[0]
    assert len(ids) == cut and labels == full[1][1][:cut] and any(t != D.IGNORE for t in labels[1:])


def test_sharegpt_jsonl_and_an_hf_folder_of_messages_load_alike(tmp_path, conversations):
    import datasets

    rows = conversations[:30]
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    sharegpt = [{"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in r["messages"]]}
                for r in rows]
    (tmp_path / "share.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sharegpt))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert D.load_rows(str(tmp_path / "share.jsonl")) == rows
    assert D.load_rows(str(tmp_path / "hf")) == rows


def test_chat_split_is_seeded_deduplicated_and_leak_free(tmp_path, conversations):
    # b repeats 100 of a's prompts (other case and spacing) with other answers: they must be kept once
    a = conversations[:300]
    b = [{"messages": [{**t, "content": "  " + t["content"].upper() + " "} if t["role"] != "assistant"
                       else {**t, "content": "another answer"} for t in r["messages"]]} for r in a[:100]]
    b += conversations[300:400]
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(sources=[DataSource(str(tmp_path / "a.jsonl"), 0.75), DataSource(str(tmp_path / "b.jsonl"), 0.25)],
                    cache_dir=str(tmp_path / "cache"))
    folder = D.prepare_splits(spec)
    train, val = D.read_split(folder, "train"), D.read_split(folder, "val")
    keys = lambda rows: {chat.dedup_key(r["messages"]) for r in rows}  # noqa: E731
    assert not keys(train) & keys(val), "a conversation's prompt is on both sides"
    assert len(keys(train + val)) == len(train + val) == 400  # 300 + the 100 new ones, no repeat
    assert not any(t["content"] == "another answer" for r in train + val for t in r["messages"])
    assert D.prepare_splits(spec) == folder
    assert D.read_split(D.prepare_splits(DataSpec(**{**spec.__dict__, "seed": 7})), "val") != val


@pytest.mark.parametrize("row,words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}, "starts with"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role 'robot'"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "non-text"),
    ({"conversations": [{"from": "human"}]}, "lacks 'from' or 'value'"),
    ({"messages": []}, "empty"),
])
def test_malformed_conversations_name_the_row_and_the_problem(tmp_path, row, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(D.DataError, match="row 0") as e:
        D.load_rows(str(path))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_chat_rows_need_the_chat_template_and_a_tokenizer_that_has_one(tiny_tokenizer, chat_tokenizer, conversations):
    with pytest.raises(D.DataError, match="set prompt_template: chat"):
        D.tokenize(conversations[:3], chat_tokenizer, 512, "alpaca")
    with pytest.raises(D.DataError, match="has no chat template.*give chat_template"):
        D.tokenize(conversations[:3], tiny_tokenizer, 512, "chat")


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer, conversations):
    tok = copy.deepcopy(chat_tokenizer)
    # answers other than the last are shortened, as templates that drop earlier reasoning do
    tok.chat_template = CHATML.replace("m['content']", "(m['content'] if loop.last or m['role'] != 'assistant' "
                                                       "else m['content'][:3])")
    multi = [r for r in conversations if sum(t["role"] == "assistant" for t in r["messages"]) > 1][:2]
    with pytest.raises(D.DataError, match="renders earlier turns differently"):
        D.tokenize(multi, tok, 512, "chat")


def test_instruction_rows_become_a_user_and_an_assistant_turn(chat_tokenizer):
    rows = D.load_rows("bundled:tiny-dolly")[:20]
    examples, _ = D.tokenize(rows, chat_tokenizer, 512, "chat")
    for row, (ids, labels) in zip(rows, examples):
        [(a, b)] = _runs(labels)
        assert chat_tokenizer.decode(ids[a:b]) == row["response"] + "</s>"
        assert row["instruction"] in chat_tokenizer.decode(ids[:a]) and row["context"] in chat_tokenizer.decode(ids)


@pytest.mark.slow
def test_chat_fine_tune_learns_the_assistant_turns(tmp_path):
    spec = preset("tiny", base_model="tiny-chat", prompt_template="chat", out=str(tmp_path / "run"), max_steps=16,
                  lr=3e-3, r=8, alpha=16, per_device_batch=8, grad_accum=1, eval_before=True, max_seq_len=256,
                  data={"sources": [{"name": "bundled:tiny-chat"}], "total_rows": 200, "cache_dir": str(tmp_path / "d")})
    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    assert result["n_train"] + result["n_val"] == 200 and result["dropped_too_long"] == 0
    assert result["val_loss"] < result["val_loss_before"] - 0.5, "the adapter did not learn the conversations"


def test_a_base_model_without_a_template_takes_one_from_a_jinja_file(tmp_path):
    from jobs.tiny import CHAT_TEMPLATE

    (tmp_path / "t.jinja").write_text(CHAT_TEMPLATE)
    spec = preset("tiny", prompt_template="chat", chat_template=str(tmp_path / "t.jinja"), out=str(tmp_path / "run"),
                  max_steps=2, per_device_batch=4, grad_accum=1, max_seq_len=32,
                  data={"sources": [{"name": "bundled:tiny-chat"}], "total_rows": 60, "cache_dir": str(tmp_path / "d")})
    result = F.run(spec)
    assert result["status"] == "ok", result.get("reason")
    # a 32-token cut leaves about a third of the conversations without an answer: dropped, and counted
    assert result["dropped_too_long"] > 0 and result["n_train"] + result["n_val"] + result["dropped_too_long"] == 60
    bare = F.run(spec.replace(chat_template=None, out=str(tmp_path / "bare")))
    assert bare["status"] == "failed" and "no chat template" in bare["reason"]
