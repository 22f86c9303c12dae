"""`python -m orchestrator server` without a server: what it says when nothing runs, its input checks, and that
it stays torch-free (the running server is tested in tests/test_server.py).

    .venv/bin/python -m pytest -q tests/test_server_cli.py
"""
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.tracking.postgres import ServerError, pgpass_line, pgpass_password, split_password
from orchestrator.tracking.server_auth import LoginThrottle, check_login

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "server", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_status_of_a_server_never_started_is_3_stopped(tmp_path):
    done = _cli("status", "--dir", str(tmp_path / "lab"))
    assert done.returncode == 3
    assert "mlflow server: stopped" in done.stdout and "postgres: stopped" in done.stdout


def test_users_need_a_running_server_with_logins(tmp_path):
    done = _cli("--dir", str(tmp_path), "add-user", "alice")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: users and permissions need the server running with logins: "
                                   "python -m orchestrator server start --auth")


def test_a_bad_setting_is_refused_before_anything_is_written(tmp_path):
    done = _cli("start", "--dir", str(tmp_path / "lab"), "--port", "70000")
    assert done.returncode == 2 and done.stderr.strip() == "error: --port must be 1..65535, got 70000"
    assert not (tmp_path / "lab").exists()


def test_the_server_command_and_the_preflight_never_import_torch(tmp_path):
    script = ("import sys\nfrom orchestrator.__main__ import main\n"
              f"code = main(['server', 'status', '--dir', r'{tmp_path}'])\n"
              "from jobs.tracking_store import StoreError, check_store\n"
              "try:\n    check_store('http://127.0.0.1:9')\nexcept StoreError:\n    pass\n"
              "print('HEAVY', [m for m in ('torch', 'transformers', 'peft') if m in sys.modules], 'CODE', code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "HEAVY [] CODE 3" in out.stdout, out.stdout + out.stderr


def test_a_login_that_could_never_work_is_refused_before_the_server_is_asked(tmp_path):
    for args, says in ((["a:b"], "error: user name 'a:b' is not allowed: use 1 to 64 letters"),
                       (["a\nb"], "error: user name 'a\\nb' is not allowed"),
                       (["bob", "--password", "x" * 100_000], "error: --password must have 12 to 128 characters")):
        done = _cli("--dir", str(tmp_path), "add-user", *args)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stderr.startswith(says), done.stderr


@pytest.mark.unit
def test_names_and_passwords_that_work_in_an_http_login_and_a_credentials_file():
    for name in ("alice", "a.b_c-d+e@lab", "x" * 64, "7up"):
        check_login(name, None)
    for password in ("A-good_one~42!", "x" * 128, "colons:are:fine"):
        check_login("alice", password)
    for name, password in (("a:b", None), ("", None), ("x" * 65, None), ("-x", None), ("a b", None),
                           ("alice", "x" * 11), ("alice", "x" * 129), ("alice", "tab\tinside12"),
                           ("alice", "percent%sign1"), ("alice", "non-ascii-\u00e9-1")):
        with pytest.raises(ServerError):
            check_login(name, password)


@pytest.mark.unit
def test_failed_logins_lock_a_name_out_for_a_while_then_let_it_try_again(tmp_path):
    throttle = LoginThrottle(str(tmp_path / "logins.db"), max_failures=3, window_s=60, lock_s=30)
    assert throttle.wait_s("u", 0.0) is None
    for t in (0.0, 1.0):
        throttle.failed("u", t)
    assert throttle.wait_s("u", 2.0) == 0.0  # failures on record, not locked yet
    throttle.failed("u", 2.0)
    assert throttle.wait_s("u", 2.0) == 30.0 and throttle.wait_s("u", 31.0) == 1.0
    assert throttle.wait_s("other", 2.0) is None
    assert throttle.wait_s("u", 32.0) == 0.0
    throttle.failed("u", 70.0)  # the window has passed: counting starts over
    assert throttle.wait_s("u", 70.0) == 0.0
    throttle.succeeded("u")
    assert throttle.wait_s("u", 70.0) is None
    assert (tmp_path / "logins.db").stat().st_mode & 0o777 == 0o600


def test_a_password_in_a_database_uri_moves_to_a_password_file(tmp_path):  # not unit: SQLAlchemy takes ~1 s to import
    uri = "postgresql+psycopg2://lab:p%40ss%3Aw0rd@db.example:5432/mlflow?sslmode=require"
    assert split_password(uri) == ("postgresql+psycopg2://lab@db.example:5432/mlflow?sslmode=require", "p@ss:w0rd")
    assert split_password("postgresql+psycopg2://lab@db/mlflow") == ("postgresql+psycopg2://lab@db/mlflow", None)
    assert split_password("not a uri") == ("not a uri", None)
    (tmp_path / "pgpass").write_text(pgpass_line("other", "x") + pgpass_line("l:ab", "p@ss:w\\0rd"))
    assert pgpass_password(tmp_path / "pgpass", "l:ab") == "p@ss:w\\0rd"
    assert pgpass_password(tmp_path / "pgpass", "nobody") is None
