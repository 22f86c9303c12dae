"""`python -m orchestrator server` without a server: what it says when nothing runs, its input checks, and that
it stays torch-free (the running server is tested in tests/test_server.py).

    .venv/bin/python -m pytest -q tests/test_server_cli.py
"""
import subprocess
import sys
from pathlib import Path

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
