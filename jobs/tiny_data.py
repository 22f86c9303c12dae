"""Generate the bundled instruction sets of the embedded default (run once; the output is committed).

    python -m jobs.tiny_data

Two small, license-clean, synthetic sets in the schemas of the paper's two sources, so that the tiny preset
exercises the same mixing code as the real Alpaca/Dolly mix:
  tiny_alpaca.jsonl  instruction / input / output             (Stanford Alpaca's columns)
  tiny_dolly.jsonl   instruction / context / response / category (Databricks Dolly's columns)
The tasks are templated and partly compositional (copying, lookup, small arithmetic, ordering), so a tiny
model learns them measurably within seconds, and the validation loss responds to the learning rate, the
rank and alpha. Every row is generated from a fixed seed: rerunning gives identical files.
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "assets"
COUNTRIES = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Australia": "Canberra", "Russia": "Moscow",
    "Turkey": "Ankara", "Cuba": "Havana", "Iceland": "Reykjavik",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "early": "late",
    "strong": "weak", "open": "closed", "rich": "poor", "young": "old", "up": "down", "wet": "dry",
    "loud": "quiet", "full": "empty", "hard": "soft", "high": "low", "long": "short", "near": "far",
    "clean": "dirty", "thick": "thin",
}
NOUNS = ["apple", "river", "table", "garden", "window", "pencil", "bridge", "candle", "forest", "rocket",
         "basket", "mirror", "button", "castle", "dragon", "ladder", "planet", "pocket", "saddle", "tunnel"]
NAMES = ["Alice", "Bruno", "Chen", "Dmitri", "Elena", "Farah", "Goran", "Hana", "Ivan", "Julia", "Kofi",
         "Lena", "Marco", "Nadia", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Yuki"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
POSITIVE = ["wonderful", "excellent", "delightful", "great", "lovely", "superb"]
NEGATIVE = ["terrible", "awful", "boring", "poor", "dreadful", "disappointing"]


def _alpaca_row(rng: random.Random) -> dict:
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} plus {b} equals {a + b}."}
    if kind == 1:
        country = rng.choice(sorted(COUNTRIES))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {COUNTRIES[country]}."}
    if kind == 2:
        word, n = rng.choice(NOUNS), rng.randrange(2, 5)
        return {"instruction": f"Repeat the given word {n} times.", "input": word, "output": " ".join([word] * n)}
    if kind == 3:
        words = rng.sample(NOUNS, rng.randrange(3, 6))
        return {"instruction": "Reverse the order of these words.", "input": ", ".join(words),
                "output": ", ".join(reversed(words))}
    if kind == 4:
        nums = rng.sample(range(1, 100), rng.randrange(3, 6))
        return {"instruction": "Sort these numbers in ascending order.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    if kind == 5:
        word = rng.choice(sorted(OPPOSITES))
        return {"instruction": f"Give the opposite of the word \"{word}\".", "input": "",
                "output": f"The opposite of \"{word}\" is \"{OPPOSITES[word]}\"."}
    word = rng.choice(NOUNS)
    return {"instruction": f"Write the plural of the noun \"{word}\".", "input": "", "output": f"{word}s"}


def _dolly_row(rng: random.Random) -> dict:
    kind = rng.randrange(4)
    name, color, noun = rng.choice(NAMES), rng.choice(COLORS), rng.choice(NOUNS)
    if kind == 0:
        context = f"Yesterday {name} bought a {color} {noun} at the market and carried it home."
        return {"instruction": "Who is mentioned in the text?", "context": context, "response": name,
                "category": "information_extraction"}
    if kind == 1:
        context = f"The {noun} in the picture is {color}. It belongs to {name}."
        return {"instruction": f"What color is the {noun}?", "context": context,
                "response": f"The {noun} is {color}.", "category": "closed_qa"}
    if kind == 2:
        good = rng.random() < 0.5
        adjective = rng.choice(POSITIVE if good else NEGATIVE)
        context = f"The {noun} I ordered was {adjective}, said {name}."
        return {"instruction": "Is the sentiment of this review positive or negative?", "context": context,
                "response": "positive" if good else "negative", "category": "classification"}
    a, b = rng.sample(range(2, 30), 2)
    context = f"The {color} box weighs {a} kilograms. The {noun} weighs {b} kilograms."
    heavier = f"the {color} box" if a > b else f"the {noun}"
    return {"instruction": "Which is heavier?", "context": context,
            "response": f"{heavier[0].upper()}{heavier[1:]} is heavier.", "category": "closed_qa"}


def corpus_sentences(n: int, seed: int = 3) -> list[str]:
    """Plain declarative text about the same small world, for the tiny base model's pretraining.

    It teaches the base model words and facts, not the instruction format: that is what LoRA must learn."""
    rng = random.Random(seed)

    def capital():
        country = rng.choice(sorted(COUNTRIES))
        return f"The capital of {country} is {COUNTRIES[country]}."

    def addition():
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return f"{a} plus {b} equals {a + b}."

    def opposite():
        word = rng.choice(sorted(OPPOSITES))
        return f"The opposite of {word} is {OPPOSITES[word]}."

    makers = [
        capital, addition, opposite,
        lambda: f"{rng.choice(NAMES)} bought a {rng.choice(COLORS)} {rng.choice(NOUNS)} and it was "
                f"{rng.choice(POSITIVE + NEGATIVE)}.",
        lambda: f"The {rng.choice(COLORS)} {rng.choice(NOUNS)} weighs {rng.randrange(2, 30)} kilograms.",
        lambda: (lambda w: f"One {w}, two {w}s.")(rng.choice(NOUNS)),
        lambda: ", ".join(map(str, sorted(rng.sample(range(1, 100), rng.randrange(3, 6))))) + ".",
    ]
    return [makers[rng.randrange(len(makers))]() for _ in range(n)]


def _write(path: Path, make, n: int, seed: int) -> None:
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < n:
        row = make(rng)
        key = json.dumps(row, sort_keys=True)
        if key not in seen:  # ship unique rows; the pipeline de-duplicates real data itself
            seen.add(key)
            rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    _write(HERE / "tiny_alpaca.jsonl", _alpaca_row, 1400, seed=1)
    _write(HERE / "tiny_dolly.jsonl", _dolly_row, 600, seed=2)
    print("wrote", HERE / "tiny_alpaca.jsonl", HERE / "tiny_dolly.jsonl")
