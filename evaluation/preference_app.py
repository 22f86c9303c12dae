"""The blind rating web page of a preference study (stdlib http.server, no framework, no files served).

    python -m evaluation.preference serve study.db --raters alice,bob [--host 127.0.0.1] [--port 8765]

Raters open the printed URL, give their personal token (evaluation/preference_raters.py), and see one
question at a time with two answers, left and right, and three buttons (left better, tie, right better).
Which model is on the left is drawn once per (rater, question), stored, and balanced over each rater's
questions. The token is the rater's identity: logging in again with it resumes where they stopped, and
nothing a client sends can name another rater.

Safety: listens on 127.0.0.1 unless told otherwise; every page but the login form needs a session, which
needs a rater's token (looked up by its hash) and lapses when that token is reissued; the session cookie is
HttpOnly and SameSite=Strict and only its hash is stored; every vote is a POST carrying the session's nonce
(a cross-site form cannot know it) from the same origin. Inputs are checked (known question id, choice in
left/right/tie, exactly the expected fields, body size) and refused with 400 (403 for an unknown token or a
wrong nonce, 401 without a session, 409 for a second vote on a question); all text shown is HTML-escaped and
a strict CSP forbids scripts. Each vote is committed to the study file (WAL, full fsync) before the answer
is sent. Threads are bounded and idle connections closed: evaluation/bounded_server.py.
"""
from __future__ import annotations

import hmac
import html
import io
import re
import secrets
import sys
import time
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from evaluation import preference_store as pref
from evaluation import preference_raters as raters
from evaluation.bounded_server import BoundedServer

COOKIE = "pref_sid"
MAX_BODY = 4096
TOKEN_RE = re.compile(r"[\x21-\x7e]{1,128}")
# Referrer-Policy same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on the
# form posts, which the same-origin check below would refuse.
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY", "Referrer-Policy": "same-origin",
           "Cache-Control": "no-store"}
STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
.pair{display:flex;gap:1rem}.pair>div{flex:1;min-width:0}
.ans{border:1px solid #bbb;border-radius:6px;padding:.8rem;white-space:pre-wrap}
.q{background:#f3f3f3;padding:.8rem;border-radius:6px;white-space:pre-wrap}.bar{background:#ddd;height:.5rem}
.bar div{background:#4a7;height:.5rem}button{font-size:1rem;padding:.5rem 1rem;margin:.5rem .5rem 0 0}
.err{color:#a00}"""


class Refused(Exception):
    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def login_form(message: str = "") -> str:
    err = f"<p class=err>{html.escape(message)}</p>" if message else ""
    return page("Preference study", f"""<h1>Preference study</h1>{err}
<p>You will see questions, each with two answers. Pick the better answer, or a tie.</p>
<form method=post action=/login>
<p><label>Your personal token <input name=token type=password required maxlength=128 id=token></label></p>
<button type=submit id=login>Start</button></form>""")


def rating_page(con, session: dict) -> str:
    rater = session["rater"]
    qids = pref.question_ids(con)
    done = {r[0] for r in con.execute("SELECT qid FROM votes WHERE rater = ?", (rater,))}
    todo = [q for q in qids if q not in done]
    bar = f"<div class=bar><div style='width:{100 * len(done) // len(qids)}%'></div></div>"
    who = f"<p>Rater <b>{html.escape(rater)}</b>: {len(done)} of {len(qids)} questions rated.</p>{bar}"
    if not todo:
        return page("Thank you", f"<h1 id=done>Thank you!</h1>{who}<p>All {len(qids)} questions are rated. "
                                 "Your votes are saved; you can close this page.</p>")
    qid = todo[0]
    cat, question, ans_a, ans_b = con.execute(
        "SELECT category, question, answer_a, answer_b FROM questions WHERE qid = ?", (qid,)).fetchone()
    left_is = pref.assign_sides(con, rater)[qid]
    left, right = (ans_a, ans_b) if left_is == "A" else (ans_b, ans_a)
    e = html.escape
    return page(f"Question {len(done) + 1} of {len(qids)}", f"""{who}
<h2>Question {len(done) + 1} of {len(qids)} <small>({e(cat)})</small></h2><div class=q id=question>{e(question)}</div>
<div class=pair><div><h3>Left answer</h3><div class=ans id=left>{e(left) or '<i>(empty answer)</i>'}</div></div>
<div><h3>Right answer</h3><div class=ans id=right>{e(right) or '<i>(empty answer)</i>'}</div></div></div>
<form method=post action=/vote><input type=hidden name=qid value="{e(qid)}">
<input type=hidden name=nonce value="{e(session['nonce'])}">
<button name=choice value=left id=vote-left>Left is better</button>
<button name=choice value=tie id=vote-tie>Tie</button>
<button name=choice value=right id=vote-right>Right is better</button></form>""")


def make_handler(study: str):
    """A request handler class bound to one study file, for a BoundedServer (it reads the request that the
    server has already received, from memory)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "preference"
        sys_version = ""
        timeout = 10  # seconds per socket operation while answering: a client that never reads its reply

        def setup(self):
            super().setup()
            self.rfile.close()
            self.rfile = io.BytesIO(self.server.received.pop(self.request, b""))

        def do_GET(self):
            self._dispatch({"/": self._index, "/rate": self._rate})

        def do_POST(self):
            self._dispatch({"/login": self._login, "/vote": self._vote})

        def _dispatch(self, routes: dict):
            con = None
            try:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    raise Refused(HTTPStatus.NOT_FOUND, "no such page")
                con = pref.connect(study)
                route(con)
            except Refused as r:
                body = login_form(r.message) if r.status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) \
                    else page(r.status.phrase, f"<h1>{r.status.value} {html.escape(r.status.phrase)}</h1><p "
                                               f"class=err>{html.escape(r.message)}</p><p><a href=/rate>Back</a></p>")
                self._send(r.status, body)
            finally:
                if con is not None:
                    con.close()

        def _send(self, status: HTTPStatus, body: str = "", location: str | None = None, cookie: str | None = None):
            data = body.encode()
            self.send_response(status)
            for k, v in HEADERS.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            if location:
                self.send_header("Location", location)
            if cookie:
                self.send_header("Set-Cookie", f"{COOKIE}={cookie}; HttpOnly; SameSite=Strict; Path=/")
            self.end_headers()
            self.wfile.write(data)

        def _session(self, con) -> dict:
            jar = SimpleCookie()
            try:
                jar.load(self.headers.get("Cookie", ""))
            except Exception:
                jar = SimpleCookie()
            sid = jar[COOKIE].value if COOKIE in jar else ""
            # the session's token must still be its rater's: a reissued token ends the old sessions
            row = con.execute("SELECT s.rater, s.nonce FROM sessions s JOIN raters r ON r.name = s.rater AND "
                              "r.token_hash = s.token_hash WHERE s.sid = ?",
                              (raters.secret_hash(sid[:100]),)).fetchone() if sid else None
            if row is None:
                raise Refused(HTTPStatus.UNAUTHORIZED, "please log in with your personal token")
            return {"rater": row[0], "nonce": row[1]}

        def _form(self, fields: tuple) -> dict:
            origin = self.headers.get("Origin")
            if origin and origin not in (f"http://{self.headers.get('Host')}",):
                raise Refused(HTTPStatus.FORBIDDEN, "cross-site request refused")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise Refused(HTTPStatus.LENGTH_REQUIRED, "Content-Length missing") from None
            if not 0 <= length <= MAX_BODY:
                raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"form larger than {MAX_BODY} bytes")
            if not self.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
                raise Refused(HTTPStatus.BAD_REQUEST, "expected a form (application/x-www-form-urlencoded)")
            try:
                raw = parse_qs(self.rfile.read(length).decode("utf-8"), keep_blank_values=True, strict_parsing=True,
                               max_num_fields=10)
            except (ValueError, UnicodeDecodeError):
                raise Refused(HTTPStatus.BAD_REQUEST, "malformed form") from None
            if set(raw) != set(fields) or any(len(v) != 1 for v in raw.values()):
                raise Refused(HTTPStatus.BAD_REQUEST, f"the form must hold exactly the fields {', '.join(fields)}")
            return {k: v[0] for k, v in raw.items()}

        def _index(self, con):
            try:
                self._session(con)
                self._send(HTTPStatus.SEE_OTHER, location="/rate")
            except Refused:
                self._send(HTTPStatus.OK, login_form())

        def _login(self, con):
            token = self._form(("token",))["token"]
            found = raters.rater_of_token(con, token) if TOKEN_RE.fullmatch(token) else None
            if found is None:
                raise Refused(HTTPStatus.FORBIDDEN, "unknown token: use the personal token you were given (the "
                                                    "study's organizer can reissue a lost one)")
            name, token_hash = found
            sid, nonce = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
            con.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                        (raters.secret_hash(sid), name, nonce, token_hash, time.time()))
            pref.assign_sides(con, name)
            self._send(HTTPStatus.SEE_OTHER, location="/rate", cookie=sid)

        def _rate(self, con):
            self._send(HTTPStatus.OK, rating_page(con, self._session(con)))

        def _vote(self, con):
            session = self._session(con)
            form = self._form(("qid", "nonce", "choice"))
            if not hmac.compare_digest(form["nonce"].encode(), session["nonce"].encode()):
                raise Refused(HTTPStatus.FORBIDDEN, "stale or forged form: reload the page and vote again")
            if len(form["qid"]) > pref.MAX_ID_CHARS or form["qid"] not in pref.question_ids(con):
                raise Refused(HTTPStatus.BAD_REQUEST, "unknown question id")
            if form["choice"] not in ("left", "right", "tie"):
                raise Refused(HTTPStatus.BAD_REQUEST, "choice must be left, right or tie")
            if pref.record_vote(con, session["rater"], form["qid"], form["choice"]) is None:
                raise Refused(HTTPStatus.CONFLICT, "you already voted on this question: the first vote is final")
            self._send(HTTPStatus.SEE_OTHER, location="/rate")

    return Handler


def make_server(study: str, host: str = "127.0.0.1", port: int = 8765, new_raters: str | None = None,
                workers: int = 8, idle_timeout: float = 30.0, max_connections: int = 256):
    """(server, {name: token} of the raters added now): a BoundedServer not yet serving. Names in
    `new_raters` ("alice,bob") that exist already keep their tokens. Fails before adding anyone when the
    study, the names, the numbers or the address are bad, and when the study would have no rater."""
    if not 1 <= workers <= max_connections or not idle_timeout > 0:
        raise pref.EvalError(f"--workers {workers} / --idle-timeout {idle_timeout} are invalid: 1 to "
                             f"{max_connections} workers and an idle timeout > 0 seconds")
    names = raters.parse_raters(new_raters) if new_raters is not None else []
    con = pref.open_study(study)  # a missing or empty study fails here, before listening
    try:
        if not names and not raters.raters(con):
            raise pref.EvalError(f"study {study} has no raters: add them with `serve {study} --raters alice,bob`")
        try:
            server = BoundedServer((host, port), make_handler(study), workers, idle_timeout, max_connections,
                                   max_body=MAX_BODY)
        except (OSError, OverflowError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise pref.EvalError(f"cannot listen on {host}:{port} ({why}): choose another --host/--port") from None
        try:
            tokens = raters.add_raters(con, names, skip_existing=True)
        except BaseException:
            server.server_close()
            raise
    finally:
        con.close()
    return server, tokens


def serve(study: str, host: str = "127.0.0.1", port: int = 8765, new_raters: str | None = None,
          workers: int = 8, idle_timeout: float = 30.0) -> None:
    server, tokens = make_server(study, host, port, new_raters, workers, idle_timeout)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: anyone who can reach it and holds a token can vote as that rater; "
              "plain HTTP (no TLS): put it behind an HTTPS proxy for use beyond this machine", file=sys.stderr)
    raters.print_tokens(tokens)
    kept = [n for n in (raters.parse_raters(new_raters) if new_raters else []) if n not in tokens]
    if kept:
        print(f"already raters, tokens unchanged: {', '.join(kept)} (`raters {study} --reissue NAME` for a new one)")
    print(f"serving {study} on http://{host}:{server.server_address[1]}/  ({workers} workers)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
