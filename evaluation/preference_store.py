"""The human-preference study's data: questions, both models' answers, raters, sides, votes (one SQLite file),
and the report's statistics; the command line is evaluation/preference.py, the rating page preference_app.py.

The paper's human study as a feature: answers of two models, blind pairwise votes, a preference report.

    python -m evaluation.preference generate study.db --a-adapter models:/tiny-nomad-adapter@champion \\
        --b-base tiny --questions evaluation/assets/questions.jsonl --max-new-tokens 256
    python -m evaluation.preference serve study.db --raters alice,bob   # prints each new rater's token once
    python -m evaluation.preference raters study.db --add carol          # more raters; --reissue NAME; list
    python -m evaluation.preference report study.db [--tracking-uri URI] [--run-id RUN]

The study file is one SQLite database (WAL, one writer: the local server): the questions with both answers,
the settings that made them, the raters (name and the hash of their personal token), their sessions, the
sides each rater was shown and the votes. `generate` refuses to overwrite an existing study (votes refer to its answers). Questions are JSONL rows
{"question_id", "category", "question"}; the bundled set (evaluation/assets/questions.jsonl) is 30 open
questions in the Vicuna categories, written for this project. Answers use the Alpaca prompt the adapters were
trained with; greedy unless --temperature > 0 (then seeded per side).

Raters: each has a personal token, printed once when the rater is added (`serve --raters` or `raters --add`)
and stored hashed; the token is the rater's identity (evaluation/preference_raters.py).

Votes: one per rater and question, the first is final (a second is refused with 409): raters judge blind and
a study should not be revisited after the answers were compared. The report counts A's wins, ties and losses
over all votes; the preference score is (wins + ties / 2) / n, with a 95% percentile bootstrap interval that
resamples questions (not votes: votes on one question are not independent), seeded, 2000 draws by default.
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

from evaluation.tasks.common import EvalError

BUNDLED_QUESTIONS = Path(__file__).resolve().parent / "assets" / "questions.jsonl"
MAX_QUESTION_CHARS = 4000
MAX_ID_CHARS = 64
CHOICES = ("A", "B", "tie")
# sessions.sid and raters.token_hash hold SHA-256 hex digests, never the secrets themselves; a session is
# valid while its token_hash is its rater's current one (a reissued token ends the old sessions).
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS questions (qid TEXT PRIMARY KEY, pos INTEGER NOT NULL, category TEXT NOT NULL,
    question TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (sid TEXT PRIMARY KEY, rater TEXT NOT NULL, nonce TEXT NOT NULL,
    token_hash TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sides (rater TEXT NOT NULL, qid TEXT NOT NULL REFERENCES questions(qid),
    left_is TEXT NOT NULL CHECK (left_is IN ('A', 'B')), PRIMARY KEY (rater, qid));
CREATE TABLE IF NOT EXISTS votes (rater TEXT NOT NULL, qid TEXT NOT NULL REFERENCES questions(qid),
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')), left_is TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (rater, qid));
"""


# ------------------------------------------------------------------------------------------- study file
def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in WAL mode with full fsync: a committed vote survives a crash of the process or machine."""
    con = sqlite3.connect(str(path), timeout=30, isolation_level=None)  # autocommit; writes use explicit BEGIN
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.execute("PRAGMA foreign_keys=ON")
    con.executescript(SCHEMA)
    return con


def open_study(path: str | Path) -> sqlite3.Connection:
    if not Path(path).is_file():
        raise EvalError(f"study file {path} does not exist: create it with `python -m evaluation.preference "
                        "generate`")
    con = connect(path)
    if not con.execute("SELECT count(*) FROM questions").fetchone()[0]:
        raise EvalError(f"study file {path} holds no questions: it is not a finished `generate` output")
    return con


def meta(con) -> dict:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def question_ids(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT qid FROM questions ORDER BY pos")]


def read_questions(path: str | Path | None = None) -> list[dict]:
    """Validated question rows from a JSONL file (default: the bundled set)."""
    path = Path(path or BUNDLED_QUESTIONS)
    if not path.is_file():
        raise EvalError(f"question file {path} does not exist: give a JSONL file of "
                        '{"question_id", "category", "question"} rows')
    rows, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{path}:{n} is not JSON ({e.msg}): one object per line") from None
        qid, text = str(r.get("question_id", "")), r.get("question") or r.get("text")  # Vicuna files use "text"
        if not qid or len(qid) > MAX_ID_CHARS or not isinstance(text, str) or not text.strip():
            raise EvalError(f"{path}:{n} needs a question_id (1-{MAX_ID_CHARS} chars) and a non-empty question")
        if len(text) > MAX_QUESTION_CHARS or qid in seen:
            why = "is a duplicate id" if qid in seen else f"is longer than {MAX_QUESTION_CHARS} characters"
            raise EvalError(f"{path}:{n} question {qid} {why}: fix the file")
        seen.add(qid)
        rows.append({"question_id": qid, "category": str(r.get("category") or "general")[:MAX_ID_CHARS],
                     "question": text.strip()})
    if not rows:
        raise EvalError(f"question file {path} holds no questions")
    return rows


# ---------------------------------------------------------------------------------------------- generate
def side_label(base: str | None, adapter: str | None) -> str:
    return f"{base or '(adapter base)'} + {adapter}" if adapter else f"{base or 'tiny'} (no adapter)"


def answers(base: str | None, adapter: str | None, questions: list[dict], max_new_tokens: int,
            temperature: float, seed: int, batch_size: int, device: str | None = None) -> list[str]:
    """One model's answers to the questions (the model is freed before returning)."""
    from evaluation.generate import generate
    from evaluation.model import load
    from jobs.data import format_prompt

    model, tokenizer, _ = load(base if (base or adapter) else "tiny", adapter, device=device)
    prompts = [format_prompt({"instruction": q["question"], "context": ""}) for q in questions]
    out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   temperature=temperature, seed=seed)
    del model
    return [text.strip() for text in out]


def create_study(path: str | Path, sides: dict, questions: list[dict], settings: dict) -> Path:
    """Generate both sides' answers and write a new study file; `sides` = {"A": {"base", "adapter", "seed"},
    "B": {...}}, `settings` = {"max_new_tokens", "temperature", "batch_size", "device"}."""
    if Path(path).exists():
        raise EvalError(f"study file {path} already exists: votes refer to its answers, choose a new file name")
    made = {s: answers(spec.get("base"), spec.get("adapter"), questions, settings["max_new_tokens"],
                       settings["temperature"], spec.get("seed", 0), settings.get("batch_size", 8),
                       settings.get("device")) for s, spec in sides.items()}
    labels = {f"model_{s}": {**spec, "label": side_label(spec.get("base"), spec.get("adapter"))}
              for s, spec in sides.items()}
    return write_study(path, questions, made, {"settings": settings, **labels})


def write_study(path: str | Path, questions: list[dict], made: dict, info: dict) -> Path:
    """Write questions with answers `made` = {"A": [...], "B": [...]} and `info` (into meta) to a new file."""
    path = Path(path)
    if path.exists():
        raise EvalError(f"study file {path} already exists: votes refer to its answers, choose a new file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    for suffix in ("", "-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    con = connect(tmp)
    con.execute("BEGIN")
    con.executemany("INSERT INTO questions VALUES (?, ?, ?, ?, ?, ?)",
                    [(q["question_id"], i, q["category"], q["question"], made["A"][i], made["B"][i])
                     for i, q in enumerate(questions)])
    info = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "salt": random.SystemRandom().getrandbits(64), **info}
    con.executemany("INSERT INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in info.items()])
    con.execute("COMMIT")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    tmp.rename(path)  # a crash during writing leaves no half-made study under the real name
    for suffix in ("-wal", "-shm"):
        Path(str(tmp) + suffix).unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------ sides, votes
def assign_sides(con, rater: str) -> dict:
    """{qid: "A" or "B" on the left} for `rater`, drawn once and stored: stable across sessions and restarts,
    and balanced (A is on the left for half the questions, to one) so a left-bias cancels out."""
    have = dict(con.execute("SELECT qid, left_is FROM sides WHERE rater = ?", (rater,)).fetchall())
    qids = question_ids(con)
    todo = [q for q in qids if q not in have]
    if todo:
        rng = random.Random(f"{meta(con)['salt']}:{rater}")
        n_a = sum(v == "A" for v in have.values())
        target = len(qids) // 2 + (len(qids) % 2 and rng.random() < 0.5)  # an odd question out goes either way
        lefts = ["A"] * max(0, target - n_a)
        lefts += ["B"] * (len(todo) - len(lefts))
        rng.shuffle(lefts)
        con.execute("BEGIN IMMEDIATE")
        con.executemany("INSERT OR IGNORE INTO sides VALUES (?, ?, ?)",
                        [(rater, q, side) for q, side in zip(todo, lefts[:len(todo)])])
        con.execute("COMMIT")
        have = dict(con.execute("SELECT qid, left_is FROM sides WHERE rater = ?", (rater,)).fetchall())
    return have


def record_vote(con, rater: str, qid: str, shown: str) -> str | None:
    """Store a vote given as the side clicked ("left", "right" or "tie"); returns the choice in A/B terms, or
    None when this rater already voted on this question (the first vote is final). Committed before return."""
    if shown not in ("left", "right", "tie"):
        raise ValueError(f"choice {shown!r} is invalid: left, right or tie")
    left = assign_sides(con, rater)[qid]
    choice = "tie" if shown == "tie" else left if shown == "left" else ("B" if left == "A" else "A")
    con.execute("BEGIN IMMEDIATE")
    cur = con.execute("INSERT OR IGNORE INTO votes VALUES (?, ?, ?, ?, ?)", (rater, qid, choice, left, time.time()))
    con.execute("COMMIT")
    return choice if cur.rowcount == 1 else None


def votes(con) -> list[dict]:
    return [{"rater": r, "qid": q, "choice": c} for r, q, c in
            con.execute("SELECT rater, qid, choice FROM votes ORDER BY ts, rater, qid")]


# ------------------------------------------------------------------------------------------------ report
def preference(vote_rows: list[dict], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """A vs B over all votes: counts, score (wins + ties / 2) / n, percentile bootstrap interval over questions."""
    score_of = {"A": 1.0, "tie": 0.5, "B": 0.0}
    by_q: dict[str, list[float]] = {}
    for v in vote_rows:
        by_q.setdefault(v["qid"], []).append(score_of[v["choice"]])
    n = sum(len(s) for s in by_q.values())
    counts = {k: sum(v["choice"] == k for v in vote_rows) for k in CHOICES}
    raters: dict[str, dict] = {}
    for v in vote_rows:
        r = raters.setdefault(v["rater"], {"votes": 0, "A": 0, "B": 0, "tie": 0})
        r["votes"] += 1
        r[v["choice"]] += 1
    out = {"n_votes": n, "n_questions": len(by_q), "n_raters": len(raters), "wins_a": counts["A"],
           "ties": counts["tie"], "losses_a": counts["B"], "score_a": None, "ci_low": None, "ci_high": None,
           "ci": f"{level:.0%} percentile bootstrap over questions, {n_boot} draws, seed {seed}", "raters": raters}
    if n == 0:
        return out
    out["score_a"] = sum(sum(s) for s in by_q.values()) / n
    groups = list(by_q.values())
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        draw = [groups[rng.randrange(len(groups))] for _ in groups]
        stats.append(sum(sum(g) for g in draw) / sum(len(g) for g in draw))
    stats.sort()
    tail = (1 - level) / 2
    out["ci_low"] = stats[int(tail * (n_boot - 1))] if stats else None
    out["ci_high"] = stats[int(round((1 - tail) * (n_boot - 1)))] if stats else None
    return out


def markdown(result: dict, info: dict) -> str:
    a, b = info.get("model_A", {}).get("label", "A"), info.get("model_B", {}).get("label", "B")
    score = "-" if result["score_a"] is None else (
        f"{result['score_a']:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]")
    lines = [f"# Pairwise preference: A = {a} vs B = {b}", "",
             "| votes | questions | raters | A wins | ties | B wins | preference for A |",
             "|---|---|---|---|---|---|---|",
             f"| {result['n_votes']} | {result['n_questions']} | {result['n_raters']} | {result['wins_a']} | "
             f"{result['ties']} | {result['losses_a']} | {score} |", "",
             f"Preference = (A wins + ties / 2) / votes; interval: {result['ci']}.", "",
             "| rater | votes | A | tie | B |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {c['votes']} | {c['A']} | {c['tie']} | {c['B']} |" for r, c in sorted(result["raters"].items())]
    return "\n".join(lines) + "\n"


def _experiment(client, uri: str) -> str:
    """The "preference" experiment's id; in a local SQLite store its artifacts go beside the database
    (<store>/artifacts/preference), as the orchestrator's studies do, not into MLflow's ./mlruns default."""
    exp = client.get_experiment_by_name("preference")
    if exp:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///"):]).parent.resolve() / "artifacts" / "preference").as_uri()
    return client.create_experiment("preference", artifact_location=location)


def log_report(result: dict, info: dict, tracking_uri: str | None, run_id: str | None) -> str:
    """Metrics + preference/report.json and .md into `run_id`, or into a new run of experiment "preference",
    in the store `jobs.tracking_store.resolve(tracking_uri)` names (the project's store by default)."""
    from mlflow.entities import Metric

    from jobs import tracking_store

    uri = tracking_store.resolve(tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    client = tracking_store.client(uri)
    new = run_id is None
    if new:
        run_id = client.create_run(_experiment(client, uri), tags={
            "mlflow.runName": "preference", "model_A": info["model_A"]["label"][:5000],
            "model_B": info["model_B"]["label"][:5000]}).info.run_id
    now = int(time.time() * 1000)
    keys = ("n_votes", "n_questions", "n_raters", "wins_a", "ties", "losses_a", "score_a", "ci_low", "ci_high")
    client.log_batch(run_id, metrics=[Metric(f"pref_{k}", float(result[k]), now, 0) for k in keys
                                      if result[k] is not None])
    client.log_dict(run_id, {**result, "model_A": info.get("model_A"), "model_B": info.get("model_B"),
                             "settings": info.get("settings")}, "preference/report.json")
    client.log_text(run_id, markdown(result, info), "preference/report.md")
    if new:
        client.set_terminated(run_id)
    return run_id
