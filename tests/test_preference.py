"""The human-preference study: generation on the tiny model, the rating server's safety (personal tokens,
forged / replayed / cross-rater requests, idle connections) and durability, the report's numbers and its
MLflow store, and a real browser voting on every question.

    .venv/bin/python -m pytest -q tests/test_preference.py              # all but the browser test: -m "not ui"

Generation uses the tiny base model on both sides with different sampling seeds (plumbing: prompts, both
sides, the study file), not a trained adapter: adapter loading is evaluation.model.load's, tested in
tests/test_eval_model.py. Server tests run on a study written by hand (known answers, 30 questions).
"""
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from evaluation import preference as pref
from evaluation import preference_raters as raters
from evaluation.preference_app import make_server
from evaluation.tasks.common import EvalError

REPO = Path(__file__).resolve().parents[1]


def _study(path: Path, n: int = 30, question: str = "Question {i}?") -> Path:
    qs = [{"question_id": f"q{i:02d}", "category": "generic", "question": question.format(i=i)} for i in range(n)]
    made = {"A": [f"answer A{i}" for i in range(n)], "B": [f"answer B{i}" for i in range(n)]}
    info = {"model_A": {"label": "tuned"}, "model_B": {"label": "default"}, "settings": {}}
    return pref.write_study(path, qs, made, info)


def _serve(study, raters_csv="ann,bob,cy", **kw):
    """(server, port, {name: token}) of a server on `study`, serving in a thread."""
    srv, tokens = make_server(str(study), port=0, new_raters=raters_csv, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1], tokens


@pytest.fixture()
def server(tmp_path):
    srv, port, tokens = _serve(_study(tmp_path / "study.db"))
    yield tmp_path / "study.db", port, tokens
    srv.shutdown()
    srv.server_close()


def _request(port, method, path, form=None, cookie=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = dict(headers or {})
    body = None
    if form is not None:
        body = form if isinstance(form, (str, bytes)) else urlencode(form)
        hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
    if cookie:
        hdrs["Cookie"] = f"pref_sid={cookie}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text, resp


def _login(port, token):
    status, _, resp = _request(port, "POST", "/login", {"token": token})
    assert status == 303 and resp.getheader("Location") == "/rate"
    cookie = resp.getheader("Set-Cookie")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return cookie.split(";")[0].split("=", 1)[1]


def _current(port, sid):
    """(qid, nonce, left answer text) of the question the rater is shown now, or None when done."""
    status, page, _ = _request(port, "GET", "/rate", cookie=sid)
    assert status == 200
    if 'id=done' in page:
        return None
    qid = re.search(r'name=qid value="([^"]+)"', page).group(1)
    nonce = re.search(r'name=nonce value="([^"]+)"', page).group(1)
    left = re.search(r"id=left>([^<]*)<", page).group(1)
    return qid, nonce, left


def _vote(port, sid, choice, qid=None, nonce=None):
    q, n, _ = _current(port, sid)
    return _request(port, "POST", "/vote", {"qid": qid or q, "nonce": nonce or n, "choice": choice}, cookie=sid)[0]


# ------------------------------------------------------------------------------------------- generation
def test_generate_on_tiny_model_writes_both_sides(tmp_path, tiny_model_dir):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in pref.read_questions()[:3]))
    study = tmp_path / "study.db"
    rc = pref.main(["generate", str(study), "--a-base", "tiny", "--a-seed", "1", "--b-base", "tiny", "--b-seed", "2",
                    "--questions", str(questions), "--max-new-tokens", "12", "--temperature", "3.0",
                    "--device", "cpu"])
    assert rc == 0
    con = pref.open_study(study)
    rows = con.execute("SELECT qid, answer_a, answer_b FROM questions ORDER BY pos").fetchall()
    assert [r[0] for r in rows] == ["q01", "q02", "q03"]
    assert all(a.strip() and b.strip() for _, a, b in rows)
    # the untrained tiny base answers "." at T <= 1: T = 3 makes seeds matter; the same seed repeats itself
    assert any(a != b for _, a, b in rows), "different seeds should sample different answers"
    again = pref.answers("tiny", None, pref.read_questions(questions), 12, 3.0, 1, 8, "cpu")
    assert again == [a for _, a, _ in rows]
    info = pref.meta(con)
    assert info["model_A"]["seed"] == 1 and info["model_B"]["seed"] == 2
    assert info["settings"]["max_new_tokens"] == 12 and "tiny" in info["model_A"]["label"]
    assert not list(tmp_path.glob("*.partial*"))
    # an existing study is never overwritten (votes refer to its answers)
    assert pref.main(["generate", str(study), "--questions", str(questions), "--device", "cpu"]) == 2


def test_bundled_questions_are_valid_and_bad_files_are_refused(tmp_path):
    rows = pref.read_questions()
    assert len(rows) == 30 and len({r["question_id"] for r in rows}) == 30
    assert len({r["category"] for r in rows}) >= 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": "x", "question": "a"}\n{"question_id": "x", "question": "b"}\n')
    with pytest.raises(EvalError, match="duplicate"):
        pref.read_questions(bad)
    bad.write_text('{"question_id": "x"}\n')
    with pytest.raises(EvalError, match="non-empty question"):
        pref.read_questions(bad)
    vicuna = tmp_path / "vicuna.jsonl"  # the Vicuna file's own field name is "text"
    vicuna.write_text('{"question_id": 1, "category": "generic", "text": "How?"}\n')
    assert pref.read_questions(vicuna) == [{"question_id": "1", "category": "generic", "question": "How?"}]


# ---------------------------------------------------------------------------------------------- server
def test_token_and_session_are_required(server):
    study, port, tokens = server
    assert _request(port, "GET", "/")[0] == 200
    assert _request(port, "GET", "/rate")[0] == 401
    assert _request(port, "GET", "/rate", cookie="forged")[0] == 401
    assert _request(port, "POST", "/vote", {"qid": "q00", "nonce": "x", "choice": "tie"})[0] == 401
    assert _request(port, "POST", "/login", {"token": "wrong"})[0] == 403
    assert _request(port, "POST", "/login", {"token": ""})[0] == 403
    assert _request(port, "POST", "/login", {"token": tokens["ann"] + "x"})[0] == 403
    for path in ("/../study.db", "/study.db", "/evaluation/preference.py", "/rate/../etc/passwd"):
        assert _request(port, "GET", path)[0] == 404
    status, page, resp = _request(port, "GET", "/")
    assert "script-src" not in resp.getheader("Content-Security-Policy") and "default-src 'none'" in \
        resp.getheader("Content-Security-Policy")
    assert pref.open_study(study).execute("SELECT count(*) FROM sessions").fetchone()[0] == 0


def test_inputs_are_validated(server):
    study, port, tokens = server
    sid = _login(port, tokens["ann"])
    qid, nonce, _ = _current(port, sid)
    assert _vote(port, sid, "left", qid="q99") == 400
    assert _vote(port, sid, "left", qid="x" * 500) == 400
    assert _vote(port, sid, "A") == 400
    assert _vote(port, sid, "") == 400
    assert _vote(port, sid, "tie", nonce="forged") == 403
    form = urlencode({"qid": qid, "nonce": nonce, "choice": "tie", "extra": "1"})
    assert _request(port, "POST", "/vote", form, cookie=sid)[0] == 400
    form = urlencode({"qid": qid, "nonce": nonce, "choice": "tie"}) + "&choice=left"
    assert _request(port, "POST", "/vote", form, cookie=sid)[0] == 400
    assert _request(port, "POST", "/vote", "x" * 5000, cookie=sid)[0] == 413
    assert _request(port, "POST", "/vote", json.dumps({"qid": qid}), cookie=sid,
                    headers={"Content-Type": "application/json"})[0] == 400
    good = {"qid": qid, "nonce": nonce, "choice": "tie"}
    assert _request(port, "POST", "/vote", good, cookie=sid, headers={"Origin": "http://evil.example"})[0] == 403
    assert _request(port, "POST", "/login", urlencode({"token": tokens["ann"]}) + "&token=x")[0] == 400
    assert pref.votes(pref.open_study(study)) == []  # nothing refused was recorded


def test_a_rater_can_neither_vote_as_another_nor_invent_one(server):
    study, port, tokens = server
    con = pref.open_study(study)
    ann, bob = _login(port, tokens["ann"]), _login(port, tokens["bob"])
    qid, ann_nonce, _ = _current(port, ann)
    _, bob_nonce, _ = _current(port, bob)
    # invented raters: a made-up token, a name next to a real token, a rater field on the vote form
    assert _request(port, "POST", "/login", {"token": "mallory-token-123"})[0] == 403
    assert _request(port, "POST", "/login", {"name": "mallory", "token": tokens["ann"]})[0] == 400
    assert _request(port, "POST", "/vote", {"qid": qid, "nonce": ann_nonce, "choice": "tie", "rater": "mallory"},
                    cookie=ann)[0] == 400
    # forged: what the study file stores (hashes) is no credential
    token_hash, sid_hash = con.execute("SELECT r.token_hash, s.sid FROM raters r JOIN sessions s ON s.rater = r.name "
                                       "WHERE r.name = 'ann'").fetchone()
    assert _request(port, "POST", "/login", {"token": token_hash})[0] == 403
    assert _request(port, "GET", "/rate", cookie=sid_hash)[0] == 401
    # cross-rater: one rater's session with the other's nonce
    assert _vote(port, bob, "left", qid=qid, nonce=ann_nonce) == 403
    assert _vote(port, ann, "left", qid=qid, nonce=bob_nonce) == 403
    assert pref.votes(con) == []
    # bob's session votes as bob, whatever question it names; ann's own vote is untouched and hers alone
    assert _vote(port, bob, "tie", qid=qid, nonce=bob_nonce) == 303
    ann_vote = {"qid": qid, "nonce": ann_nonce, "choice": "right"}
    assert _request(port, "POST", "/vote", ann_vote, cookie=ann)[0] == 303
    assert _request(port, "POST", "/vote", ann_vote, cookie=ann)[0] == 409  # replayed
    assert sorted((v["rater"], v["qid"]) for v in pref.votes(con)) == [("ann", qid), ("bob", qid)]
    # a reissued token: the old token and the old session stop, replays included; the votes stay
    new_token = raters.reissue_token(con, "ann")
    assert _request(port, "POST", "/login", {"token": tokens["ann"]})[0] == 403
    q2, _, _ = _current(port, _login(port, tokens["cy"]))
    assert _request(port, "POST", "/vote", {"qid": q2, "nonce": ann_nonce, "choice": "tie"}, cookie=ann)[0] == 401
    page = _request(port, "GET", "/rate", cookie=_login(port, new_token))[1]
    assert "Rater <b>ann</b>: 1 of 30 questions rated" in page
    assert {v["rater"] for v in pref.votes(con)} == {"ann", "bob"} and len(pref.votes(con)) == 2
    assert {r[0] for r in con.execute("SELECT rater FROM sessions")} <= {"ann", "bob", "cy"}


def test_output_is_html_escaped(tmp_path):
    srv, port, tokens = _serve(_study(tmp_path / "s.db", n=2, question="<script>alert({i})</script> & co"))
    try:
        page = _request(port, "GET", "/rate", cookie=_login(port, tokens["ann"]))[1]
        assert "<script>" not in page and "&lt;script&gt;alert(0)&lt;/script&gt; &amp; co" in page
    finally:
        srv.shutdown()
        srv.server_close()


def test_one_vote_per_rater_and_question_the_first_is_final(server):
    study, port, tokens = server
    sid = _login(port, tokens["ann"])
    qid, nonce, _ = _current(port, sid)
    assert _vote(port, sid, "left", qid=qid, nonce=nonce) == 303
    assert _vote(port, sid, "right", qid=qid, nonce=nonce) == 409
    sid2 = _login(port, tokens["ann"])  # a second session of the same rater is the same rater
    assert _vote(port, sid2, "right", qid=qid) == 409
    con = pref.open_study(study)
    left = pref.assign_sides(con, "ann")[qid]
    assert pref.votes(con) == [{"rater": "ann", "qid": qid, "choice": left}]
    # another rater may vote on the same question
    assert _vote(port, _login(port, tokens["bob"]), "tie", qid=qid) == 303
    assert len(pref.votes(con)) == 2


def test_sides_are_stable_per_rater_and_balanced(tmp_path):
    con = pref.open_study(_study(tmp_path / "s.db", n=30))
    first = {r: pref.assign_sides(con, r) for r in ("ann", "bob", "cy")}
    again = pref.open_study(tmp_path / "s.db")
    for rater, sides in first.items():
        assert pref.assign_sides(again, rater) == sides
        assert sum(v == "A" for v in sides.values()) == 15
    assert first["ann"] != first["bob"] or first["bob"] != first["cy"]
    odd = pref.open_study(_study(tmp_path / "odd.db", n=7))
    counts = [sum(v == "A" for v in pref.assign_sides(odd, f"r{i}").values()) for i in range(20)]
    assert set(counts) <= {3, 4} and len(set(counts)) == 2  # the odd question goes either way across raters
    # "left" means the model shown on the left
    for q, left in list(first["ann"].items())[:4]:
        assert pref.record_vote(con, "ann", q, "left") == left
        assert pref.record_vote(con, "ann", q, "right") is None


def _tokens(text: str) -> dict:
    return dict(re.findall(r"token for (\S+): (\S+)", text))


def test_raters_are_added_with_tokens_printed_once_and_stored_hashed(tmp_path, capsys):
    study = str(_study(tmp_path / "s.db", n=3))
    assert pref.main(["serve", study, "--port", "0"]) == 2  # no rater yet: refused before listening
    assert "has no raters" in capsys.readouterr().err
    assert pref.main(["raters", study, "--add", "dee,eve"]) == 0
    tokens = _tokens(capsys.readouterr().out)
    assert set(tokens) == {"dee", "eve"} and len(set(tokens.values())) == 2
    assert all(len(t) >= 24 for t in tokens.values())
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("s.db*"))
    for token in tokens.values():
        assert token.encode() not in stored and raters.secret_hash(token).encode() in stored
    for bad in (["--add", "dee"], ["--add", "bad name"], ["--add", "x,x"], ["--reissue", "nobody"]):
        assert pref.main(["raters", study, *bad]) == 2, bad
        assert capsys.readouterr().err.startswith("error: ")
    assert pref.main(["serve", study, "--port", "0", "--raters", "fay,<b>"]) == 2
    assert pref.main(["serve", study, "--port", "0", "--raters", "fay", "--workers", "0"]) == 2
    assert pref.main(["serve", study, "--port", "99999", "--raters", "fay"]) == 2  # cannot listen: no token made
    assert raters.raters(pref.open_study(study)) == ["dee", "eve"]  # nothing added by a refused command
    assert pref.main(["raters", study]) == 0
    assert capsys.readouterr().out.splitlines() == ["dee: 0 votes", "eve: 0 votes"]


def _start(study, *args):
    """A server process; returns (process, port, {name: token} printed at start)."""
    proc = subprocess.Popen([sys.executable, "-m", "evaluation.preference", "serve", str(study), "--port", "0", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    while not lines or not lines[-1].startswith("serving"):
        lines.append(proc.stdout.readline())
        assert lines[-1], f"the server exited before serving: {lines}"
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[-1])
    assert match, f"unexpected last line: {lines[-1]!r}"
    return proc, int(match.group(1)), _tokens("".join(lines))


def test_a_killed_server_loses_no_vote(tmp_path):
    study = _study(tmp_path / "s.db", n=5)
    proc, port, tokens = _start(study, "--raters", "ann")
    try:
        sid = _login(port, tokens["ann"])
        assert [_vote(port, sid, c) for c in ("left", "right", "tie")] == [303, 303, 303]
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean shutdown: the votes must already be on disk
        proc.wait()
    proc, port, again = _start(study, "--raters", "ann")  # the same command again: ann keeps her token
    try:
        assert again == {}
        assert len(pref.votes(pref.open_study(study))) == 3
        page = _request(port, "GET", "/rate", cookie=sid)[1]  # the session survives a restart
        assert "3 of 5 questions rated" in page and "Question 4 of 5" in page
        assert _vote(port, sid, "left") == 303
    finally:
        proc.terminate()
        proc.wait()
    assert len(pref.votes(pref.open_study(study))) == 4
    new_token = raters.reissue_token(pref.open_study(study), "ann")
    proc, port, _ = _start(study)
    try:
        assert _request(port, "GET", "/rate", cookie=sid)[0] == 401  # a reissued token ends the old sessions
        assert _request(port, "POST", "/login", {"token": tokens["ann"]})[0] == 403
        assert "4 of 5 questions rated" in _request(port, "GET", "/rate", cookie=_login(port, new_token))[1]
    finally:
        proc.terminate()
        proc.wait()


def _wait_for(condition, what: str, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.02)


def _closed_by_server(sock) -> bool:
    """Blocks until the server closes `sock` (True) or the socket's own timeout passes (raises)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# a client that connects and sends nothing, half a head, or a head whose body never comes (slowloris)
IDLE = [b"", b"GET /rate HTTP/1.1\r\nHost: x\r\n", b"POST /vote HTTP/1.0\r\nContent-Length: 40\r\n\r\nqid="]


def test_idle_connections_hold_no_thread_and_cannot_lock_out_a_rater(tmp_path):
    baseline = threading.active_count()
    srv, port, tokens = _serve(_study(tmp_path / "s.db", n=5), workers=2, idle_timeout=3600, max_connections=40)
    idle = []
    try:
        for i in range(60):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=60))
            idle[-1].sendall(IDLE[i % 3])
        # past max_connections the oldest waiting ones are closed to admit new ones
        assert all(_closed_by_server(s) for s in idle[:20])
        _wait_for(lambda: srv.open_connections() == (40, 0), "40 connections waiting")
        sid = _login(port, tokens["ann"])  # a real rater is answered while 40 idle clients hold their sockets
        assert [_vote(port, sid, c) for c in ("left", "right", "tie")] == [303, 303, 303]
        assert "3 of 5 questions rated" in _request(port, "GET", "/rate", cookie=sid)[1]
        # the first of those 8 requests made room by closing the oldest idle connection; a later one closes
        # another only if it came before a worker had released the previous one's place
        assert _closed_by_server(idle[20])
        assert threading.active_count() <= baseline + 1 + 2  # the serving thread and at most 2 workers
        _wait_for(lambda: srv.open_connections()[1] == 0, "the workers to finish")
        assert 40 - 8 <= srv.open_connections()[0] <= 39
    finally:
        for s in idle:
            s.close()
        srv.shutdown()
        srv.server_close()


def test_idle_connections_are_closed_after_the_idle_timeout(tmp_path):
    srv, port, tokens = _serve(_study(tmp_path / "s.db", n=2), workers=1, idle_timeout=0.5)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(12)]
    try:
        for i, s in enumerate(idle):
            s.sendall(IDLE[i % 3])
        assert all(_closed_by_server(s) for s in idle)
        _wait_for(lambda: srv.open_connections() == (0, 0), "no connection left open")
    finally:
        for s in idle:
            s.close()
        srv.shutdown()
        srv.server_close()


# ---------------------------------------------------------------------------------------------- report
KNOWN = [("ann", "q1", "A"), ("ann", "q2", "A"), ("ann", "q3", "tie"), ("bob", "q1", "A"), ("bob", "q2", "B"),
         ("bob", "q3", "tie")]


def test_report_numbers_on_a_known_vote_set():
    r = pref.preference([{"rater": a, "qid": q, "choice": c} for a, q, c in KNOWN], n_boot=500, seed=1)
    assert (r["wins_a"], r["ties"], r["losses_a"], r["n_votes"], r["n_questions"]) == (3, 2, 1, 6, 3)
    assert r["score_a"] == pytest.approx(4 / 6)
    assert r["raters"] == {"ann": {"votes": 3, "A": 2, "B": 0, "tie": 1}, "bob": {"votes": 3, "A": 1, "B": 1, "tie": 1}}
    # questions score 1.0 (q1), 0.5 (q2), 0.5 (q3): a bootstrap over questions stays within [0.5, 1]
    assert 0.5 <= r["ci_low"] <= r["score_a"] <= r["ci_high"] <= 1.0 and r["ci_low"] < r["ci_high"]
    assert pref.preference([{"rater": a, "qid": q, "choice": c} for a, q, c in KNOWN], n_boot=500, seed=1) == r
    unanimous = pref.preference([{"rater": "x", "qid": f"q{i}", "choice": "B"} for i in range(5)])
    assert (unanimous["score_a"], unanimous["ci_low"], unanimous["ci_high"]) == (0.0, 0.0, 0.0)
    assert pref.preference([])["score_a"] is None


def test_report_is_logged_to_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient

    study = _study(tmp_path / "s.db", n=3)
    con = pref.open_study(study)
    for rater, q, c in KNOWN:  # KNOWN's q1..q3 are the study's q00..q02, voted through the shown sides
        qid = f"q{int(q[1:]) - 1:02d}"
        left = pref.assign_sides(con, rater)[qid]
        shown = "tie" if c == "tie" else "left" if left == c else "right"
        assert pref.record_vote(con, rater, qid, shown) == c
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert pref.main(["report", str(study), "--tracking-uri", uri, "--seed", "1"]) == 0
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("preference").experiment_id])
    m = run.data.metrics
    assert (m["pref_wins_a"], m["pref_ties"], m["pref_losses_a"], m["pref_n_raters"]) == (3, 2, 1, 2)
    assert m["pref_score_a"] == pytest.approx(4 / 6) and m["pref_ci_low"] <= m["pref_score_a"] <= m["pref_ci_high"]
    assert run.data.tags["model_A"] == "tuned"
    local = client.download_artifacts(run.info.run_id, "preference", str(tmp_path / "dl"))
    report = json.loads((Path(local) / "report.json").read_text())
    assert report["raters"]["bob"] == {"votes": 3, "A": 1, "B": 1, "tie": 1}
    assert "| 6 | 3 | 2 | 3 | 2 | 1 |" in (Path(local) / "report.md").read_text()
    other = client.create_run(client.create_experiment("study")).info.run_id
    assert pref.main(["report", str(study), "--tracking-uri", uri, "--run-id", other]) == 0
    assert client.get_run(other).data.metrics["pref_n_votes"] == 6


def test_report_uses_the_project_store_by_default(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    study = _study(tmp_path / "s.db", n=3)
    con = pref.open_study(study)
    pref.record_vote(con, "ann", "q00", "tie")
    monkeypatch.chdir(tmp_path)  # the project folder: the default store is ./mlruns/mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert pref.main(["report", str(study)]) == 0
    assert not (tmp_path / "mlflow.db").exists()  # MLflow's own default is not used
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("preference").experiment_id])
    assert run.data.metrics["pref_ties"] == 1
    assert (tmp_path / "mlruns" / "artifacts" / "preference" / run.info.run_id / "artifacts" / "preference" /
            "report.md").is_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other/mlflow.db")  # the variable wins
    assert pref.main(["report", str(study)]) == 0
    other = MlflowClient(f"sqlite:///{tmp_path}/other/mlflow.db")
    assert len(other.search_runs([other.get_experiment_by_name("preference").experiment_id])) == 1


# --------------------------------------------------------------------------------------------- browser
CHROMIUM = os.environ.get("LORA_HPO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.ui
def test_a_rater_votes_on_every_question_in_a_browser(tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright package: .venv/bin/pip install playwright")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"the browser test needs Chromium at {CHROMIUM}: apt-get install chromium "
                    "(or set LORA_HPO_CHROMIUM)")
    shots = Path(os.environ.get("LORA_HPO_UI_SCREENSHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    study = _study(tmp_path / "s.db", n=4)
    srv, port, tokens = _serve(study, "ann")
    url = f"http://127.0.0.1:{port}/"
    clicks = ["left", "right", "tie", "left"]
    expected = {"A": 0, "B": 0, "tie": 0}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                           args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page()
            page.set_default_timeout(30_000)
            page.goto(url)
            page.fill("#token", tokens["ann"])
            page.click("#login")
            sides = pref.assign_sides(pref.open_study(study), "ann")
            for i, click in enumerate(clicks):
                page.wait_for_selector(f"text=Question {i + 1} of 4")
                qid = f"q{i:02d}"
                shown_left = page.inner_text("#left")
                assert shown_left == f"answer {sides[qid]}{i}"  # the page shows the stored side on the left
                if i == 1:
                    page.screenshot(path=str(shots / "preference_rating.png"), full_page=True)
                page.click(f"#vote-{click}")
                expected["tie" if click == "tie" else sides[qid] if click == "left" else
                         ("B" if sides[qid] == "A" else "A")] += 1
            page.wait_for_selector("#done")
            assert "4 of 4 questions rated" in page.inner_text("body")
            page.screenshot(path=str(shots / "preference_done.png"), full_page=True)
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    print(f"screenshots: {shots}")
    r = pref.preference(pref.votes(pref.open_study(study)))
    assert (r["wins_a"], r["ties"], r["losses_a"], r["n_votes"]) == (expected["A"], expected["tie"], expected["B"], 4)
    assert r["raters"] == {"ann": {"votes": 4, **expected}}
    assert f"| ann | 4 | {expected['A']} | {expected['tie']} | {expected['B']} |" in pref.markdown(r, {})
