"""The lab's MLflow server (`python -m orchestrator server`): a real PostgreSQL, a real `mlflow server` with
proxied artifacts and MLflow's basic-auth app, real clients and real orchestrator processes.

    .venv/bin/python -m pytest -q -m server tests/test_server.py

One server for the whole session (users alice and bob), in a folder under /var/tmp (as root PostgreSQL runs
as the postgres user, which must be able to enter it). Needs Debian's postgresql package (installed by the
server itself when root) and the `server` extra (psycopg2, Flask-WTF); skips, saying which, where missing.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.tracking_store import StoreError, check_store
from orchestrator.tracking.postgres import Postgres
from orchestrator.study.journal import load_study

from .server_fixture import REPO, free_port, lab, server_cli  # noqa: F401  (registers the session fixture)

pytestmark = pytest.mark.server


def _denied(call) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as e:
        call()
    assert e.value.error_code == "PERMISSION_DENIED" or "403" in str(e.value), str(e.value)


def _hidden(folder: Path) -> list[str]:
    """A command prefix that runs a process with `folder` covered by an empty tmpfs (its own mount namespace)."""
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t tmpfs none "$1" && shift && exec "$@"', "sh", str(folder)]
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("hiding the server's folder from the reader needs root and unshare(1) (util-linux)")
    return prefix


# ------------------------------------------------------------------------------------------- tests
def test_a_run_with_a_metric_and_an_artifact_travels_through_the_server(lab, monkeypatch, tmp_path):
    alice = lab.as_user(monkeypatch, "alice")
    run = alice.create_run(alice.create_experiment("proxy-check"))
    alice.log_metric(run.info.run_id, "loss", 0.25, step=3)
    payload = os.urandom(4096)
    (tmp_path / "blob.bin").write_bytes(payload)
    alice.log_artifact(run.info.run_id, str(tmp_path / "blob.bin"), "out")
    alice.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # clients hold no path on the server's disk
    stored = list((lab.folder / "artifacts").rglob("blob.bin"))
    assert [p.read_bytes() for p in stored] == [payload]  # where the server keeps it

    reader = ("import hashlib, os, sys; from jobs.tracking_store import client, download; "
              f"assert os.listdir({str(lab.folder)!r}) == [], 'the folder is visible'; "
              f"c = client({lab.url!r}); h = c.get_metric_history({run.info.run_id!r}, 'loss'); "
              f"p = download('runs:/{run.info.run_id}/out/blob.bin', {lab.url!r}, dst={str(tmp_path / 'got')!r}); "
              "print([(m.step, m.value) for m in h], hashlib.sha256(open(p, 'rb').read()).hexdigest())")
    out = subprocess.run([*_hidden(lab.folder), sys.executable, "-c", reader], cwd=REPO, env=lab.env("alice"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["[(3,", "0.25)]", hashlib.sha256(payload).hexdigest()]


def test_basic_auth_keeps_each_users_experiment_to_themselves(lab, monkeypatch):
    alice = lab.as_user(monkeypatch, "alice")
    experiment = alice.create_experiment("alice-private")
    run = alice.create_run(experiment).info
    alice.log_metric(run.run_id, "loss", 1.0)
    alice.log_text(run.run_id, "secret", "note.txt")

    bob = lab.as_user(monkeypatch, "bob")
    assert "alice-private" not in [e.name for e in bob.search_experiments()]
    _denied(lambda: bob.get_experiment(experiment))
    _denied(lambda: bob.get_run(run.run_id))
    assert bob.search_runs([experiment]) == []  # MLflow filters searches instead of refusing them
    _denied(lambda: bob.create_run(experiment))
    _denied(lambda: bob.log_metric(run.run_id, "loss", 2.0))
    _denied(lambda: bob.download_artifacts(run.run_id, "note.txt"))

    granted = server_cli(lab.folder, "grant", "bob", "--experiment", "alice-private", "--permission", "READ", timeout=120)
    assert granted.returncode == 0, granted.stderr
    assert bob.get_run(run.run_id).data.metrics == {"loss": 1.0}  # READ: may look ...
    _denied(lambda: bob.log_metric(run.run_id, "loss", 3.0))  # ... not write

    alice = lab.as_user(monkeypatch, "alice")
    assert [m.value for m in alice.get_metric_history(run.run_id, "loss")] == [1.0]  # bob wrote nothing


def test_check_store_names_the_login_problem(lab, monkeypatch):
    lab.as_user(monkeypatch, None)
    with pytest.raises(StoreError, match=r"needs a login \(HTTP 401\).*MLFLOW_TRACKING_USERNAME"):
        check_store(lab.url)
    lab.as_user(monkeypatch, "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-alices-password")
    with pytest.raises(StoreError, match=r"rejected the login of user 'alice' \(HTTP 401\)"):
        check_store(lab.url)
    lab.as_user(monkeypatch, "alice")
    assert check_store(lab.url) == lab.url


@pytest.mark.slow
def test_three_studies_at_once_on_one_server_each_sees_its_own(lab, monkeypatch, tmp_path):
    """The current orchestrator, three processes at once: alice runs two studies (her login in the environment),
    bob one (his login in ~/.mlflow/credentials)."""
    studies = {"lab-alice-1": "alice", "lab-alice-2": "alice", "lab-bob-1": "bob"}
    envs = {"alice": lab.env("alice"), "bob": lab.env("bob", home=tmp_path / "bob-home")}
    procs = {study: subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--objective", "tests.objectives:landscape", "--executor", "local",
         "--tracking-uri", lab.url, "--study", study, "--algo", "random", "--budget", "4", "--parallel", "2",
         "--workdir", str(tmp_path / "runs"), "--poll", "0.2"],
        cwd=REPO, env=envs[user], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for study, user in studies.items()}
    for study, proc in procs.items():
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{study}:\n{out[-3000:]}"

    for user in ("alice", "bob"):
        client = lab.as_user(monkeypatch, user)
        visible = {e.name for e in client.search_experiments()}
        assert {s for s, u in studies.items() if u == user} <= visible
        assert not visible & {s for s, u in studies.items() if u != user}
        for study in [s for s, u in studies.items() if u != user]:
            _denied(lambda: client.get_experiment_by_name(study))
        for study in [s for s, u in studies.items() if u == user]:
            _check_study(client, study, load_study(tmp_path / "runs" / study))


def _check_study(client, study: str, journal) -> None:
    """One parent, one child per journaled trial (the journal's run ids), all finished, with their artifacts."""
    experiment = client.get_experiment_by_name(study).experiment_id
    runs = client.search_runs([experiment], max_results=100)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert [r.info.run_id for r in parents] == [journal.parent_run_id]
    children = {r.info.run_id: r for r in runs if r.data.tags.get("mlflow.parentRunId") == journal.parent_run_id}
    assert len(runs) == 1 + len(children)
    assert set(children) == {t.run_id for t in journal.finished} and len(journal.finished) == 4
    for run in children.values():
        assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
        assert "result.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_start_rejects_bad_input_before_starting_anything(lab, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {
        "port": (["--port", str(lab.port)], rf"port {lab.port} on 127\.0\.0\.1 is in use .*--port"),
        "database": (["--port", str(free_port()), "--backend-uri",
                      f"postgresql://mlflow:hunter2@127.0.0.1:{free_port()}/mlflow"],
                     r"--backend-uri: cannot reach the database postgresql\+psycopg2://mlflow:\*\*\*@"),
        "artifacts": (["--port", str(free_port()), "--artifacts", str(blocker / "sub")],
                      r"cannot write artifacts to .*--artifacts"),
    }
    for name, (args, expected) in cases.items():
        folder = tmp_path / name
        done = server_cli(folder, "start", *args, timeout=120)
        assert done.returncode == 2, (name, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and re.search(expected, done.stderr), (name, done.stderr)
        assert "hunter2" not in done.stderr
        assert not any((folder / p).exists() for p in ("pg", "run", "settings.json")), name


def test_lifecycle_idempotent_start_status_url_database_outage_stop(lab, monkeypatch):
    """Runs last: it stops and restarts the session's server."""
    postgres = Postgres(lab.folder / "pg", lab.folder / "log" / "postgres.log")
    mlflow_pid, pg_pid = (lab.folder / "run" / "mlflow.pid").read_text(), postgres.pid()
    again = server_cli(lab.folder, "start")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == lab.url, again.stderr
    assert (lab.folder / "run" / "mlflow.pid").read_text() == mlflow_pid and postgres.pid() == pg_pid  # no restart
    status = server_cli(lab.folder, "status", timeout=60)
    assert status.returncode == 0 and f"answering at {lab.url}" in status.stdout
    url = server_cli(lab.folder, "url", timeout=60).stdout.splitlines()
    assert url[0] == lab.url and f"ssh -N -L {lab.port}:127.0.0.1:{lab.port} " in url[1]
    assert f"MLFLOW_TRACKING_PASSWORD={lab.passwords['admin']}" in url[2]
    admin = lab.as_user(monkeypatch, "admin")
    kept = admin.create_experiment("survives-restart")

    postgres.stop()  # the database goes away under a running MLflow server
    with pytest.raises(StoreError, match=r"answers but its store fails \(HTTP 5\d\d"):
        check_store(lab.url)
    assert server_cli(lab.folder, "status", timeout=60).returncode == 1  # partly running
    assert server_cli(lab.folder, "start").returncode == 0  # brings the database back, keeps the MLflow server
    assert (lab.folder / "run" / "mlflow.pid").read_text() == mlflow_pid
    assert check_store(lab.url) == lab.url

    stopped = server_cli(lab.folder, "stop", timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert server_cli(lab.folder, "status", timeout=60).returncode == 3
    assert not Path(f"/proc/{mlflow_pid}").exists() and not Path(f"/proc/{pg_pid}").exists()
    restarted = server_cli(lab.folder, "start")  # settings remembered: same port, logins on
    assert restarted.returncode == 0 and restarted.stdout.splitlines()[0] == lab.url, restarted.stderr
    assert admin.get_experiment(kept).name == "survives-restart"  # the data lives in PostgreSQL
