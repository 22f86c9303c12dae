"""Who may vote in a preference study: raters, each with a personal token (torch-free).

    python -m evaluation.preference raters study.db --add alice,bob     # prints each new token once
    python -m evaluation.preference raters study.db --reissue alice     # a lost or leaked token: a new one
    python -m evaluation.preference raters study.db                     # the raters and their vote counts

A token is 144 random bits, printed once and stored only as its SHA-256 in the study file's `raters` table
(for a random secret of that size a plain hash is as strong as a slow one, and it makes the lookup by hash
possible). The token alone identifies its rater: the rating page asks for nothing else, so whoever holds
one token can vote only as that rater and cannot make up new raters. Reissuing replaces the hash and ends
the rater's sessions; the votes already cast stay.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import time

from evaluation.preference_store import open_study
from evaluation.tasks.common import EvalError

RATER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,39}")


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_raters(text: str) -> list[str]:
    """Rater names from "alice,bob"; a bad or repeated name is an EvalError naming it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise EvalError(f"no rater names in {text!r}: give them comma-separated, e.g. --raters alice,bob")
    for name in names:
        if not RATER_RE.fullmatch(name):
            raise EvalError(f"rater name {name!r} is invalid: 1-40 letters, digits or . _ @ -, starting with a "
                            "letter or digit")
    if len(set(names)) != len(names):
        raise EvalError(f"rater names {text!r} repeat a name: give each rater once")
    return names


def raters(con) -> list[str]:
    return [r[0] for r in con.execute("SELECT name FROM raters ORDER BY created, name")]


def add_raters(con, names: list[str], skip_existing: bool = False) -> dict[str, str]:
    """Register new raters; returns {name: token} (the only time a token exists in clear). An existing name is
    an EvalError, or skipped with `skip_existing` (then absent from the result). All or nothing."""
    have = set(raters(con))
    if not skip_existing and have & set(names):
        taken = ", ".join(sorted(have & set(names)))
        raise EvalError(f"rater(s) {taken} already exist: a lost token is replaced with `raters --reissue NAME`")
    tokens = {n: secrets.token_urlsafe(18) for n in names if n not in have}
    con.execute("BEGIN IMMEDIATE")
    con.executemany("INSERT INTO raters VALUES (?, ?, ?)",
                    [(n, secret_hash(t), time.time()) for n, t in tokens.items()])
    con.execute("COMMIT")
    return tokens


def reissue_token(con, name: str) -> str:
    """A new token for `name`; the old one stops working and the rater's sessions end (votes are kept)."""
    token = secrets.token_urlsafe(18)
    con.execute("BEGIN IMMEDIATE")
    changed = con.execute("UPDATE raters SET token_hash = ? WHERE name = ?", (secret_hash(token), name)).rowcount
    con.execute("DELETE FROM sessions WHERE rater = ?", (name,))
    con.execute("COMMIT")
    if not changed:
        raise EvalError(f"no rater named {name!r}: add one with `raters --add {name}`")
    return token


def rater_of_token(con, token: str) -> tuple[str, str] | None:
    """(name, token_hash) of the rater whose token this is, or None. Looked up by the token's hash: the lookup
    time reveals nothing usable about a token."""
    row = con.execute("SELECT name, token_hash FROM raters WHERE token_hash = ?", (secret_hash(token),)).fetchone()
    return (row[0], row[1]) if row else None


def print_tokens(tokens: dict[str, str]) -> None:
    for name, token in tokens.items():
        print(f"token for {name}: {token}   (shown once: hand it to {name} privately)", flush=True)


def manage_raters(study: str, add: str | None, reissue: str | None) -> None:
    con = open_study(study)
    if add:
        print_tokens(add_raters(con, parse_raters(add)))
    if reissue:
        print_tokens({reissue: reissue_token(con, reissue)})
    if not (add or reissue):
        counts = dict(con.execute("SELECT rater, count(*) FROM votes GROUP BY rater"))
        for name in raters(con):
            print(f"{name}: {counts.get(name, 0)} votes")
        if not raters(con):
            print(f"no raters yet: add some with `python -m evaluation.preference raters {study} --add alice,bob`")
