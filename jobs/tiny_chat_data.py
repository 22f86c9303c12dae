"""Generate the bundled chat set `bundled:tiny-chat` (run once; the output is committed).

    python -m jobs.tiny_chat_data

A small, license-clean, synthetic set of conversations in the `messages` format (role / content), about the
same small world as jobs/tiny_data.py (capitals, sums, opposites, word lists), so that the tiny model knows its
words. Conversations have one to three assistant turns, and later questions refer to earlier answers ("and if
you add 7?", "reverse them"), so the model must read the whole conversation; some open with a system turn that
changes how the assistant answers. Every row comes from a fixed seed: rerunning gives an identical file. It is
written to assets/chat/, not assets/: the tiny model is pretrained on assets/tiny_*.jsonl (jobs/tiny.py).
"""
import json
import random
from pathlib import Path

from jobs.tiny_data import COUNTRIES, NOUNS, OPPOSITES

HERE = Path(__file__).resolve().parent / "assets" / "chat"
TERSE = "You answer with as few words as possible."


def _turns(*pairs, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in pairs:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def _sums(rng: random.Random) -> dict:
    a, b = rng.randrange(1, 40), rng.randrange(1, 40)
    pairs = [(f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}.")]
    total = a + b
    for _ in range(rng.randrange(0, 3)):
        c = rng.randrange(1, 20)
        pairs.append((f"And if you add {c}?", f"{total} plus {c} equals {total + c}."))
        total += c
    return _turns(*pairs)


def _capitals(rng: random.Random) -> dict:
    countries = rng.sample(sorted(COUNTRIES), rng.randrange(1, 4))
    terse = rng.random() < 0.3
    pairs = []
    for k, country in enumerate(countries):
        question = f"What is the capital of {country}?" if k == 0 else f"And of {country}?"
        pairs.append((question, COUNTRIES[country] if terse else f"The capital of {country} is {COUNTRIES[country]}."))
    return _turns(*pairs, system=TERSE if terse else None)


def _opposites(rng: random.Random) -> dict:
    words = rng.sample(sorted(OPPOSITES), rng.randrange(1, 4))
    terse = rng.random() < 0.5
    pairs = [(f"What is the opposite of \"{w}\"?" if k == 0 else f"And of \"{w}\"?",
              OPPOSITES[w] if terse else f"The opposite of \"{w}\" is \"{OPPOSITES[w]}\".")
             for k, w in enumerate(words)]
    return _turns(*pairs, system=TERSE if terse else None)


def _word_list(rng: random.Random) -> dict:
    words = rng.sample(NOUNS, rng.randrange(3, 6))
    pairs = [(f"Remember these words: {', '.join(words)}.", f"I will remember {len(words)} words.")]
    follow = rng.sample(["reverse", "count", "first", "plural"], rng.randrange(1, 3))
    for kind in follow:
        if kind == "reverse":
            pairs.append(("Say them in reverse order.", ", ".join(reversed(words))))
        elif kind == "count":
            pairs.append(("How many words were there?", f"There were {len(words)} words."))
        elif kind == "first":
            pairs.append(("Which word came first?", f"The first word was {words[0]}."))
        else:
            pairs.append(("Give their plurals.", ", ".join(w + "s" for w in words)))
    return _turns(*pairs)


def conversation(rng: random.Random) -> dict:
    return [_sums, _capitals, _opposites, _word_list][rng.randrange(4)](rng)


def write(path: Path, n: int = 800, seed: int = 5) -> None:
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        row = conversation(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:  # unique rows; the pipeline de-duplicates real data itself
            seen.add(key)
            rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write(HERE / "tiny_chat.jsonl")
    print("wrote", HERE / "tiny_chat.jsonl")
