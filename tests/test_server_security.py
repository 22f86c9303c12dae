"""The lab server keeps its secrets (orchestrator/tracking/server.py, server_auth.py, postgres.py): every database
role needs its password, a database password never lands on a command line or in a file others can read,
logins that can never work are refused when made, and guessing passwords is throttled.

    .venv/bin/python -m pytest -q -m server tests/test_server_security.py     # 6 min on a busy 2-core machine

Real PostgreSQL, real `mlflow server` with the basic-auth app, real HTTP logins. Needs what tests/test_server.py
needs (skips, saying which, where missing).
"""
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from jobs.tracking_store import check_store
from orchestrator.tracking.postgres import HBA, PORT, Postgres, binaries
from orchestrator.tracking.server_auth import MAX_FAILURES

from .server_fixture import REPO, free_port, lab, server_cli  # noqa: F401  (registers the session fixture)

pytestmark = pytest.mark.server


def _postgres(lab) -> Postgres:
    return Postgres(lab.folder / "pg", lab.folder / "log" / "postgres.log")


def _psql(lab, database: str, sql: str, as_postgres: bool, passfile: Path | None = None):
    """psql on the private cluster's socket as its superuser, never prompting for a password (given only through
    `passfile`); as root, optionally as the `postgres` system account (which owns the socket)."""
    psql = next((str(p) for p in (binaries() / "psql", shutil.which("psql")) if p and os.access(p, os.X_OK)), None)
    if psql is None:
        pytest.skip("psql is not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPASS")}
    env.update({"PGPASSFILE": str(passfile)} if passfile else {})
    prefix = ["runuser", "-u", "postgres", "--"] if as_postgres else []
    return subprocess.run([*prefix, psql, "-w", "-h", str(lab.folder / "pg" / "run"), "-p", str(PORT), "-U", "mlflow",
                           "-d", database, "-At", "-c", sql], capture_output=True, text=True, timeout=60, cwd="/",
                          env=env)


def _login(lab, user: str, password: str) -> "requests.Response":  # noqa: F821
    import requests

    return requests.get(f"{lab.url}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        auth=(user, password), timeout=60)


def _group_cmdlines(pid: int) -> list[bytes]:
    """The command lines of every process in `pid`'s process group (the server and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) == pid:
                found.append((entry / "cmdline").read_bytes())
        except (OSError, IndexError, ValueError):
            pass
    return found


# ------------------------------------------------------------------------------------------- tests
def test_every_database_role_needs_its_password(lab):
    """As root the `postgres` system account owns the cluster's socket; it must not read the users' hashes."""
    if os.geteuid() != 0:
        pytest.skip("the postgres system account exists and is distinct only when the server runs as root")
    query = "SELECT username, password_hash FROM users"
    refused = _psql(lab, "mlflow_auth", query, as_postgres=True)
    assert refused.returncode != 0 and re.search(r"password", refused.stderr), refused.stdout + refused.stderr
    assert "admin" not in refused.stdout
    passfile = lab.folder / "auth" / "pgpass"
    allowed = _psql(lab, "mlflow_auth", query, as_postgres=False, passfile=passfile)
    assert allowed.returncode == 0 and "admin|" in allowed.stdout, allowed.stderr  # the control: the role is there
    assert (lab.folder / "pg" / "data" / "pg_hba.conf").read_text() == HBA
    assert passfile.stat().st_mode & 0o777 == 0o600 and passfile.parent.stat().st_mode & 0o777 == 0o700


def test_logins_that_could_never_work_are_refused_in_one_line(lab):
    import requests

    admin = ("admin", lab.passwords["admin"])
    cases = [("a:b", None, "user name 'a:b'"), ("a\nb", None, r"user name 'a\\nb'"), ("", None, "user name ''"),
             ("x" * 65, None, "user name"), ("carol", "x" * 100_000, "12 to 128 characters, got 100000"),
             ("carol", "short", "got 5"), ("carol", "with a space 1", "without spaces"),
             ("carol", "percent%sign12", "'%'")]
    for name, password, says in cases:
        done = server_cli(lab.folder, "add-user", name, *(["--password", password] if password else []), timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, done.stderr)
        assert re.search(says, lines[0]), (name, lines[0])
        assert password is None or password not in done.stderr
        got = requests.get(f"{lab.url}/api/2.0/mlflow/users/get", params={"username": name}, auth=admin, timeout=60)
        assert got.status_code in (400, 404), (name, got.status_code)  # nothing was created
    made = server_cli(lab.folder, "add-user", "carol.c-1@lab", "--password", "A-good_one~42!", timeout=120)
    assert made.returncode == 0, made.stderr
    assert _login(lab, "carol.c-1@lab", "A-good_one~42!").status_code == 200


def test_guessing_a_password_is_throttled_per_user(lab):
    password = secrets.token_urlsafe(18)
    assert server_cli(lab.folder, "add-user", "dave", "--password", password, timeout=120).returncode == 0
    assert _login(lab, "dave", password).status_code == 200
    for attempt in range(MAX_FAILURES):
        assert _login(lab, "dave", f"wrong-guess-{attempt:04d}").status_code == 401, attempt
    locked = _login(lab, "dave", password)  # the right password too: a lockout that answered it would be an oracle
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0, locked.text
    assert "too many failed logins for user 'dave'" in locked.text
    assert _login(lab, "alice", lab.passwords["alice"]).status_code == 200  # other users are not locked out


@pytest.mark.slow
def test_a_database_password_stays_off_command_lines_and_out_of_readable_files(lab):
    """--backend-uri with a password, on a fresh --dir: it starts (it crashed), the password is only in auth/
    (0600 in 0700), not in settings.json, not on any command line of the server's processes; later starts
    without it reuse it."""
    password = "pw-" + secrets.token_hex(12)
    connection = _postgres(lab)._connect()
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE lab_backend LOGIN PASSWORD '{password}'")
        cursor.execute("CREATE DATABASE lab_backend OWNER lab_backend")
    connection.close()
    folder = Path(tempfile.mkdtemp(prefix="lora-hpo-backend-test-", dir="/var/tmp")) / "fresh"
    port = free_port()
    uri = f"postgresql+psycopg2://lab_backend:{password}@/lab_backend?host={lab.folder / 'pg' / 'run'}&port={PORT}"
    try:
        started = server_cli(folder, "start", "--port", str(port), "--backend-uri", uri)
        assert started.returncode == 0, started.stderr
        assert password not in started.stdout + started.stderr
        url = started.stdout.splitlines()[0]
        assert check_store(url) == url
        from mlflow.tracking import MlflowClient
        assert MlflowClient(url).create_experiment("through-the-given-database")

        holders = [p for p in folder.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        assert holders == [folder / "auth" / "backend.pgpass"], holders
        assert holders[0].stat().st_mode & 0o777 == 0o600 and holders[0].parent.stat().st_mode & 0o777 == 0o700
        assert (folder / "settings.json").stat().st_mode & 0o777 == 0o600
        mlflow_pid = int((folder / "run" / "mlflow.pid").read_text())
        cmdlines = _group_cmdlines(mlflow_pid)
        assert len(cmdlines) >= 2 and not any(password.encode() in c for c in cmdlines)
        assert any(b"lab_backend" in c for c in cmdlines)  # the URI is there, without its password

        assert server_cli(folder, "stop", timeout=120).returncode == 0
        again = server_cli(folder, "start")  # no URI given: the saved one and the kept password
        assert again.returncode == 0 and again.stdout.splitlines()[0] == url, again.stderr
        assert "through-the-given-database" in [e.name for e in MlflowClient(url).search_experiments()]
    finally:
        server_cli(folder, "stop", timeout=120)
        shutil.rmtree(folder.parent, ignore_errors=True)


@pytest.mark.slow
def test_a_cluster_that_trusted_local_connections_is_switched_over(lab):
    """A private PostgreSQL made by an older version (pg_hba.conf: trust) requires passwords after its next start.
    Runs last: it restarts the session's server."""
    if os.geteuid() != 0:
        pytest.skip("needs the postgres system account (root)")
    assert server_cli(lab.folder, "stop", timeout=120).returncode == 0
    hba = lab.folder / "pg" / "data" / "pg_hba.conf"
    with open(hba, "w") as f:  # as the older version wrote it (keeps its owner, postgres) ...
        f.write("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    (lab.folder / "auth" / "pgpass").unlink()  # ... which kept no password
    started = server_cli(lab.folder, "start")
    assert started.returncode == 0, started.stderr
    assert "requiring a password for every role" in started.stderr
    assert hba.read_text() == HBA
    refused = _psql(lab, "mlflow_auth", "SELECT 1", as_postgres=True)
    assert refused.returncode != 0, refused.stdout
    assert _login(lab, "alice", lab.passwords["alice"]).status_code == 200
