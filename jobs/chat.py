"""Chat data: conversations rendered with the tokenizer's own chat template, loss on the assistant turns only.

    examples, dropped = tokenize_chat(rows, tokenizer, max_seq_len)    # jobs/data.py tokenize(..., "chat")
    text, spans = render(tokenizer, row["messages"])                    # the assistant turns' character spans

A conversation is a list of turns {"role", "content"} with roles system, user, assistant (and tool), read from
a row's `messages` (the conventional format) or ShareGPT's `conversations` of {"from", "value"} (human, gpt,
system). With prompt_template "chat", instruction rows become a user turn (instruction, then the context) and
an assistant turn (the response), so instruction and chat sets mix.

Finding the assistant tokens. HF's `apply_chat_template(..., return_assistant_tokens_mask=True)` works only
with templates that mark assistant text with `{% generation %}` blocks, and the templates models ship
(Llama 3, Qwen 2.5, Mistral, Gemma) have none. So the spans are found by rendering incrementally, which works
with any template: for assistant turn i, render the turns before it with the generation prompt
(`add_generation_prompt=True`: "<|assistant|>\\n", "<|start_header_id|>assistant<|end_header_id|>\\n\\n"...),
then the turns up to and including it; the characters between the two renderings are that turn as the model
must produce it: its content and the template's end-of-turn token ("</s>", "<|eot_id|>", "<|im_end|>"), the
trailing whitespace excluded (the separator before the next turn, which the template writes, not the model).
Each rendering must be a prefix of the next and of the whole conversation; a template that renders earlier
turns differently once later ones follow (some drop earlier reasoning) is refused with a one-line error. The
whole conversation is tokenized once, and a token carries loss when its characters overlap an assistant span
(offsets from the fast tokenizer), so the tokens are those the model sees at inference. The test compares this
mask with HF's on the tiny chat template, which has `{% generation %}` blocks (tests/test_chat.py).

Truncation cuts at max_seq_len; a conversation left with no assistant token to predict is dropped and counted.
"""
from __future__ import annotations

import re
from pathlib import Path

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "tool": "tool"}
IGNORE = -100  # jobs/data.py IGNORE


class ChatError(ValueError):
    """A malformed conversation or an unusable chat template; the message names it and the fix."""


def conversation(row: dict, where: str) -> list[dict] | None:
    """The row's turns as [{"role", "content"}], or None when the row holds no conversation (an instruction)."""
    if "messages" in row:
        turns, role_key, text_key, roles = row["messages"], "role", "content", {r: r for r in ROLES}
    elif "conversations" in row:
        turns, role_key, text_key, roles = row["conversations"], "from", "value", SHAREGPT_ROLES
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
            role_key, text_key = "role", "content"  # ShareGPT-named column holding role/content turns
    else:
        return None
    if not isinstance(turns, list) or not turns:
        raise ChatError(f"{where}: the conversation is empty or not a list of turns: fix the data")
    out = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
            raise ChatError(f"{where}: turn {k} lacks {role_key!r} or {text_key!r} (has "
                            f"{sorted(turn) if isinstance(turn, dict) else type(turn).__name__}): fix the data")
        role = roles.get(turn[role_key])
        if role is None:
            raise ChatError(f"{where}: turn {k} has role {turn[role_key]!r}: use one of {', '.join(sorted(roles))}")
        if not isinstance(turn[text_key], str):
            raise ChatError(f"{where}: turn {k} has non-text content: give text (no multimodal parts)")
        out.append({"role": role, "content": turn[text_key]})
    first = next((k for k, t in enumerate(out) if t["role"] == "assistant"), None)
    if first is None:
        raise ChatError(f"{where}: the conversation has no assistant turn, so nothing to learn: drop the row")
    if not any(t["role"] in ("user", "tool") for t in out[:first]):
        raise ChatError(f"{where}: the conversation starts with an assistant turn: it needs a user turn first")
    return out


def from_instruction(row: dict) -> list[dict]:
    """An instruction row (instruction, context, response) as a two-turn conversation."""
    user = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]


def dedup_key(turns: list[dict]) -> tuple:
    """What makes two conversations the same prompt: their non-assistant turns, normalized. Two conversations
    that differ only in their answers are one prompt, kept once (on one side of the split)."""
    return tuple((t["role"], re.sub(r"\s+", " ", t["content"]).strip().lower())
                 for t in turns if t["role"] != "assistant")


# ----------------------------------------------------------------------------------------------- rendering
def use_chat_template(tokenizer, chat_template: str | None) -> None:
    """Give the tokenizer the spec's chat template (a Jinja string, or the path of a .jinja file), if any."""
    if chat_template is None:
        return
    path = Path(chat_template).expanduser()
    if chat_template.endswith(".jinja") or ("{" not in chat_template and path.exists()):
        try:
            chat_template = path.read_text()
        except OSError as e:
            raise ChatError(f"chat_template file {chat_template} cannot be read ({e.strerror or e})") from None
    tokenizer.chat_template = chat_template


def _render(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own raise_exception (roles must alternate...) or a Jinja error
        raise ChatError(f"the chat template failed on a conversation ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}): fix the data or give chat_template") \
            from None


def render(tokenizer, turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    full = _render(tokenizer, turns, False)
    spans = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        before, upto = _render(tokenizer, turns[:i], True), _render(tokenizer, turns[:i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise ChatError("the chat template renders earlier turns differently once later turns follow (turn "
                            f"{i}), so assistant spans cannot be found by prefix: give a prefix-stable chat_template")
        end = len(upto.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return full, spans


def tokenize_chat(rows: list[dict], tokenizer, max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(input_ids, labels) per conversation: the template's rendering, labels on the assistant tokens only; cut
    at max_seq_len, and a conversation left without an assistant token to predict is dropped (counted)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatError(f"the tokenizer of this base model has no chat template ({type(tokenizer).__name__}): "
                        "give chat_template (a Jinja string or .jinja file) or use prompt_template alpaca")
    if not getattr(tokenizer, "is_fast", False):
        raise ChatError("prompt_template chat needs a fast tokenizer (character offsets): install `tokenizers`")
    rendered = [render(tokenizer, row["messages"] if "messages" in row else from_instruction(row)) for row in rows]
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
    out, dropped = [], 0
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        labels = [tok if any(s < end and e > start for start, end in spans) else IGNORE
                  for tok, (s, e) in zip(ids, offsets)]
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(t == IGNORE for t in labels[1:]):  # the first token is never predicted
            dropped += 1
            continue
        out.append((ids, labels))
    return out, dropped

