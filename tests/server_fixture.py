"""The lab's MLflow server as a pytest fixture (one per session), shared by the server-marked test modules.

    from tests.server_fixture import lab  # noqa: F401  (in a test module: registers the fixture)

`lab` starts `python -m orchestrator server start --auth` in a folder under /var/tmp (as root PostgreSQL runs as
the postgres user, which must be able to enter it), creates users alice and bob, and stops it at the end.
Skips, saying what is missing, without psycopg2/Flask-WTF or PostgreSQL (and no root to install it).
"""
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.tracking.postgres import binaries

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cli(folder: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "server", "--dir", str(folder), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def require_server_tools() -> None:
    for module, package in (("psycopg2", "psycopg2-binary"), ("flask_wtf", "Flask-WTF")):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"the server tests need {package}: pip install -e '.[server]'")
    if binaries() is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("the server tests need PostgreSQL: apt-get install postgresql (as root the server installs it)")


@dataclass
class Lab:
    folder: Path
    port: int
    url: str
    passwords: dict = field(default_factory=dict)  # user -> password (admin included)

    def as_user(self, monkeypatch, user: str | None):
        """Make this process's MLflow client log in as `user` (None: no credentials at all)."""
        monkeypatch.setenv("HOME", str(self.folder / "no-home"))  # no ~/.mlflow/credentials either
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD",
                                                                 self.passwords.get(user))):
            monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.url)

    def env(self, user: str, home: Path | None = None) -> dict:
        """A client process's environment: the login in MLflow's variables, or (given `home`) in the
        ~/.mlflow/credentials file that MLflow's client reads when they are not set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        if home is None:
            return {**env, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": self.passwords[user],
                    "HOME": str(self.folder / "no-home")}
        (home / ".mlflow").mkdir(parents=True)
        (home / ".mlflow" / "credentials").write_text(f"[mlflow]\nmlflow_tracking_username = {user}\n"
                                                      f"mlflow_tracking_password = {self.passwords[user]}\n")
        return {**env, "HOME": str(home)}


@pytest.fixture(scope="session")
def lab():
    require_server_tools()
    folder = Path(tempfile.mkdtemp(prefix="lora-hpo-mlflow-test-", dir="/var/tmp"))
    folder.chmod(0o755)
    port = free_port()
    try:
        started = server_cli(folder, "start", "--auth", "--port", str(port))
        assert started.returncode == 0, f"server start failed:\n{started.stderr}"
        url = started.stdout.splitlines()[0]
        ini = configparser.ConfigParser()
        ini.read(folder / "auth" / "basic_auth.ini")
        lab = Lab(folder, port, url, {"admin": ini["mlflow"]["admin_password"]})
        for user in ("alice", "bob"):
            made = server_cli(folder, "add-user", user, timeout=120)
            assert made.returncode == 0, made.stderr
            lab.passwords[user] = made.stdout.split("mlflow_tracking_password = ")[1].strip()
        yield lab
    finally:
        server_cli(folder, "stop", timeout=120)
        shutil.rmtree(folder, ignore_errors=True)
