"""The lab's MLflow tracking server, with one command: `mlflow server` on PostgreSQL, proxied artifacts, logins.

    python -m orchestrator server start [--auth] [--port 5000] [--host 127.0.0.1] [--dir DIR]
                                        [--backend-uri postgresql+psycopg2://...] [--artifacts PATH|s3://...]
    python -m orchestrator server url           # the tracking URI, the SSH tunnel line (and the admin login)
    python -m orchestrator server status        # exit 0 running, 3 stopped, 1 partly running
    python -m orchestrator server add-user NAME [--password P]       # --auth: prints the user's credentials
    python -m orchestrator server grant NAME --experiment STUDY [--permission READ|EDIT|MANAGE|NO_PERMISSIONS]
    python -m orchestrator server stop

Everything lives under one folder (--dir, default $LORA_HPO_MLFLOW_DIR, else ~/.local/share/lora-hpo/
mlflow-server, or /var/lib/lora-hpo/mlflow-server as root): a private PostgreSQL (orchestrator/tracking/postgres.py)
unless --backend-uri names an existing database, the artifacts (unless --artifacts is an s3:// URI:
boto3 and AWS_* / MLFLOW_S3_ENDPOINT_URL in the environment of `start`), logs (0700), pid files, settings
(0600), and the secrets in auth/ (0700, files 0600): the databases' passwords (pgpass files that `mlflow
server` gets as PGPASSFILE: a password in --backend-uri is moved there, never kept in the settings nor put on
a command line; or leave it out of the URI and let libpq find it, PGPASSWORD or ~/.pgpass), with --auth the
basic-auth app's settings and the generated admin password. Clients never see that
folder: artifacts travel through the server (`--serve-artifacts`, `mlflow-artifacts:` URIs). Settings
given once are remembered by later starts; `start` is idempotent (it restarts the MLflow server when a
setting changed) and returns once the server answers a real API call; `stop` ends only the processes its
pid files name. MLflow's GenAI job workers are off. With --auth, users see only the experiments they
created or were granted (default_permission NO_PERMISSIONS; --default-permission READ lets all read).
Environment: LORA_HPO_MLFLOW_DIR (folder), LORA_HPO_MLFLOW_TIMEOUT_S (how long `start` waits for PostgreSQL
and for the server to answer, default 120), LORA_HPO_PG_BIN (PostgreSQL's bin folder, if not Debian's).
"""
from __future__ import annotations

import argparse
import fcntl
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from jobs.tracking_store import StoreError, check_database, check_store
from orchestrator.tracking.postgres import (Postgres, ServerError, _gone, _tail, pgpass_line, pgpass_password,
                                            split_password, uri_user, with_password, write_private)
from orchestrator.tracking.server_auth import PERMISSIONS, add_user, admin_login, auth_env, check_login, grant


def default_dir() -> Path:
    if os.environ.get("LORA_HPO_MLFLOW_DIR"):
        return Path(os.environ["LORA_HPO_MLFLOW_DIR"])
    # root's home is private, and PostgreSQL runs as the postgres user: it must be able to enter the folder
    return Path("/var/lib/lora-hpo/mlflow-server") if os.geteuid() == 0 else \
        Path.home() / ".local/share/lora-hpo/mlflow-server"


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    backend_uri: str | None = None  # None: the private PostgreSQL under the folder
    artifacts: str | None = None  # None: <dir>/artifacts
    auth: bool = False
    default_permission: str = "NO_PERMISSIONS"

    def __post_init__(self):
        if not 1 <= int(self.port) <= 65535:
            raise ServerError(f"--port must be 1..65535, got {self.port}")
        if int(self.workers) < 1:
            raise ServerError(f"--workers must be at least 1, got {self.workers}")
        if self.default_permission not in PERMISSIONS:
            raise ServerError(f"--default-permission must be one of {', '.join(PERMISSIONS)}, got "
                              f"{self.default_permission!r}")
        if self.backend_uri and self.backend_uri.split(":", 1)[0] in ("postgresql", "postgres"):
            # SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql://; the server extra ships psycopg2
            self.backend_uri = "postgresql+psycopg2:" + self.backend_uri.split(":", 1)[1]


@dataclass
class Layout:
    root: Path

    def __post_init__(self):
        self.root = self.root.expanduser().absolute()
        self.settings, self.lock = self.root / "settings.json", self.root / ".lock"
        self.logs, self.run, self.auth = self.root / "log", self.root / "run", self.root / "auth"
        self.pid_file, self.ini = self.run / "mlflow.pid", self.auth / "basic_auth.ini"
        self.postgres = Postgres(self.root / "pg", self.logs / "postgres.log", self.auth / "pgpass")
        self.backend_pass = self.auth / "backend.pgpass"  # the password of --backend-uri's user

    def load(self, **given) -> Settings:
        saved = json.loads(self.settings.read_text()) if self.settings.exists() else {}
        return Settings(**{**saved, **{k: v for k, v in given.items() if v is not None}})

    def save(self, s: Settings) -> None:
        write_private(self.settings, json.dumps(asdict(s), indent=1), folder_mode=None)

    def artifacts(self, s: Settings) -> str:
        return s.artifacts or str(self.root / "artifacts")

    def backend(self, s: Settings) -> str:
        return s.backend_uri or self.postgres.uri("mlflow")


# ------------------------------------------------------------------------------------------- MLflow process
def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def mlflow_pid(layout: Layout) -> int | None:
    """The server's pid (its process group) if alive and started by us for this folder (marker in its env)."""
    try:
        pid = int(layout.pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if f"LORA_HPO_MLFLOW_SERVER={layout.root}".encode() in _environ(pid) else None


def _passfile(layout: Layout, s: Settings) -> Path | None:
    """The password file `mlflow server` gets as PGPASSFILE, if there is one."""
    passfile = layout.backend_pass if s.backend_uri else layout.postgres.passfile
    return passfile if passfile.exists() else None


def url(s: Settings) -> str:
    host = "127.0.0.1" if s.host in ("0.0.0.0", "::", "") else s.host
    return f"http://[{host}]:{s.port}" if ":" in host else f"http://{host}:{s.port}"


def _check_inputs(layout: Layout, s: Settings, password: str | None) -> None:
    """Bad input found before anything starts: the database, the artifact root, the port."""
    if s.backend_uri:
        try:
            check_database(with_password(s.backend_uri, password))
        except StoreError as e:
            raise ServerError(f"--backend-uri: {e}") from None
    dest = layout.artifacts(s)
    if dest.startswith("s3://"):
        try:
            import boto3  # noqa: F401  (the server writes S3 with it)
        except ImportError:
            raise ServerError("--artifacts s3://... needs boto3 in this environment: pip install boto3") from None
    elif "://" not in dest:
        _check_artifact_folder(Path(dest))
    with socket.socket(socket.AF_INET6 if ":" in s.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            probe.bind((s.host, s.port))
        except OSError as e:
            if e.errno == 98:  # EADDRINUSE
                raise ServerError(f"port {s.port} on {s.host} is in use by another program: choose another with "
                                  "--port (it is remembered)") from None
            raise ServerError(f"cannot listen on {s.host}:{s.port} ({e.strerror}): use --host 127.0.0.1 or an "
                              "address of this machine") from None


def _check_artifact_folder(folder: Path) -> None:
    try:
        if not folder.exists():
            folder.mkdir(parents=True)
            folder.chmod(0o700)  # only the server reads it: clients get artifacts through it, with their rights
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ServerError(f"cannot write artifacts to {folder} ({e.strerror}): choose a writable folder or an "
                          "s3://bucket/prefix with --artifacts") from None


def _start_mlflow(layout: Layout, s: Settings, timeout_s: float, log) -> None:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "LORA_HPO_MLFLOW_SERVER": str(layout.root)}
    passfile = _passfile(layout, s)
    if passfile:  # the databases' passwords reach libpq in its own file, never on the command line
        env["PGPASSFILE"] = str(passfile)
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", layout.backend(s),
               "--serve-artifacts", "--artifacts-destination", layout.artifacts(s), "--host", s.host,
               "--port", str(s.port), "--workers", str(s.workers)]
    if s.auth:
        users = layout.postgres.uri("mlflow_auth") if s.backend_uri is None else f"sqlite:///{layout.auth}/users.db"
        env.update(auth_env(layout.auth, users, s.default_permission, log))
        command += ["--app-name", "basic-auth"]
    layout.run.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.logs.chmod(0o700)
    log_file = layout.logs / "mlflow.log"
    with open(log_file, "a") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=layout.root, env=env, start_new_session=True)  # its own process group
    layout.pid_file.write_text(str(process.pid))
    login = admin_login(layout.ini) if s.auth else (None, None)
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            layout.pid_file.unlink(missing_ok=True)
            raise ServerError(f"mlflow server exited ({process.returncode}); last lines of {log_file}: "
                              f"{_tail(log_file)}")
        try:
            check_store(url(s), timeout_s=5, username=login[0], password=login[1])
            return
        except StoreError as e:
            if time.monotonic() > deadline:
                _stop_mlflow(layout, log)
                raise ServerError(f"mlflow server did not answer within {timeout_s:g} s ({e}); log: {log_file}")
        time.sleep(0.5)


def _stop_mlflow(layout: Layout, log) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL what is left after 15 s."""
    pid = mlflow_pid(layout)
    if pid is not None:
        os.killpg(pid, signal.SIGTERM)
        if not _gone(pid, 15.0):
            log(f"mlflow server (pid {pid}) ignored SIGTERM for 15 s: sending SIGKILL")
        try:
            os.killpg(pid, signal.SIGKILL)  # workers that outlived their parent, if any
        except ProcessLookupError:
            pass
    layout.pid_file.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- commands
def _log(message: str) -> None:
    print(f"server: {message}", file=sys.stderr, flush=True)


class _locked:
    """One start or stop at a time per folder (flock, waited for up to 120 s)."""

    def __init__(self, layout: Layout):
        layout.root.mkdir(parents=True, exist_ok=True)
        self.file = open(layout.lock, "w")

    def __enter__(self):
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerError(f"another server start or stop has held {self.file.name} for 120 s") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.file.close()


def start(layout: Layout, given: dict, timeout_s: float) -> Settings:
    s = layout.load(**given)
    password = None
    if s.backend_uri:  # a password given in the URI (or saved in it by an older version) moves to a 0600 file
        s.backend_uri, password = split_password(s.backend_uri)
    with _locked(layout):
        layout.root.chmod(0o755)  # PostgreSQL (as the postgres user) must enter it; secrets sit in auth/ (0700)
        running = mlflow_pid(layout)
        saved = json.loads(layout.settings.read_text()) if layout.settings.exists() else None
        stored = pgpass_password(layout.backend_pass, uri_user(s.backend_uri)) if s.backend_uri else None
        if running is not None and (saved != asdict(s) or password not in (None, stored)):
            _log("settings changed: restarting the MLflow server")
            _stop_mlflow(layout, _log)
            running = None
        if running is None:
            _check_inputs(layout, s, password or stored)  # before anything starts or is written
        if password not in (None, stored):
            write_private(layout.backend_pass, pgpass_line(uri_user(s.backend_uri), password))
        if s.backend_uri is None:
            layout.postgres.start(timeout_s, log=_log)
        passfile = _passfile(layout, s)
        if running is not None and passfile and f"PGPASSFILE={passfile}".encode() not in _environ(running):
            _log("restarting the MLflow server: it must read the database password from its file")  # older version
            _stop_mlflow(layout, _log)
            running = None
        if running is None:
            _start_mlflow(layout, s, timeout_s, _log)
        layout.save(s)
    if not s.auth and s.host not in ("127.0.0.1", "localhost", "::1"):
        _log(f"warning: listening on {s.host} without --auth: whoever reaches port {s.port} reads and writes "
             "every study")
    _log(f"up: {url(s)} (backend {'private PostgreSQL' if s.backend_uri is None else 'given database'}, "
         f"artifacts {layout.artifacts(s)}, auth {'on' if s.auth else 'off'}; logs in {layout.logs})")
    return s


def stop(layout: Layout) -> None:
    with _locked(layout):
        _stop_mlflow(layout, _log)
        layout.postgres.stop(log=_log)
    _log(f"stopped (state kept in {layout.root})")


def status(layout: Layout) -> int:
    s = layout.load()
    parts = {"mlflow server": mlflow_pid(layout)}
    if s.backend_uri is None:
        parts["postgres"] = layout.postgres.pid()
    for name, pid in parts.items():
        print(f"{name}: running (pid {pid})" if pid else f"{name}: stopped")
    up = sum(pid is not None for pid in parts.values())
    if up == 0:
        return 3
    if up < len(parts):
        return 1
    login = admin_login(layout.ini) if s.auth else (None, None)
    try:
        check_store(url(s), username=login[0], password=login[1])
    except StoreError as e:
        print(f"not answering: {e}")
        return 1
    print(f"answering at {url(s)}")
    return 0


def show_url(layout: Layout, admin: bool = True) -> None:
    s = layout.load()
    host = socket.getfqdn()
    host = socket.gethostname() if host.startswith("localhost") else host
    print(url(s))
    print(f"tunnel from your laptop: ssh -N -L {s.port}:127.0.0.1:{s.port} {getpass.getuser()}@{host}  "
          f"then open http://localhost:{s.port}")
    login = admin_login(layout.ini) if s.auth and admin else None
    if login:
        print(f"admin login: MLFLOW_TRACKING_USERNAME={login[0]} MLFLOW_TRACKING_PASSWORD={login[1]}")


def _admin(layout: Layout) -> tuple[str, tuple[str, str]]:
    """The running server's URL and admin login, for managing users."""
    s, login = layout.load(), admin_login(layout.ini)
    if not s.auth or login is None or mlflow_pid(layout) is None:
        raise ServerError("users and permissions need the server running with logins: python -m orchestrator "
                          "server start --auth")
    return url(s), login


def parser() -> argparse.ArgumentParser:
    folder = argparse.ArgumentParser(add_help=False)  # --dir before or after the subcommand
    folder.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help="the server's folder (default: "
                        "$LORA_HPO_MLFLOW_DIR, else ~/.local/share/lora-hpo/mlflow-server; as root "
                        "/var/lib/lora-hpo/mlflow-server)")
    p = argparse.ArgumentParser(prog="python -m orchestrator server", description=__doc__.split("\n")[0],
                                parents=[folder])
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("start", parents=[folder], help="start (or restart with new settings); returns once it "
                        "answers; settings given once are remembered")
    st.add_argument("--host", help="address to listen on (default 127.0.0.1: reach it through an SSH tunnel)")
    st.add_argument("--port", type=int, help="default 5000")
    st.add_argument("--workers", type=int, help="server processes (default 2)")
    st.add_argument("--backend-uri", dest="backend_uri", help="an existing database (postgresql+psycopg2://USER:"
                    "PASSWORD@HOST:PORT/DB) instead of the private PostgreSQL")
    st.add_argument("--artifacts", help="artifact root: a folder (default DIR/artifacts) or s3://bucket/prefix")
    st.add_argument("--auth", action=argparse.BooleanOptionalAction, default=None,
                    help="MLflow's basic-auth app: logins, per-experiment permissions (--no-auth turns it off)")
    st.add_argument("--default-permission", dest="default_permission", choices=PERMISSIONS,
                    help="with --auth, what users may do with others' experiments (default NO_PERMISSIONS)")
    for name, text in (("stop", "stop the MLflow server and PostgreSQL (data kept)"),
                       ("status", "exit 0 running, 3 stopped, 1 partly running or not answering"),
                       ("url", "the tracking URI, the SSH tunnel line and, with --auth, the admin login")):
        sub.add_parser(name, parents=[folder], help=text)
    au = sub.add_parser("add-user", parents=[folder], help="create a login (needs --auth); prints the lines of "
                        "its ~/.mlflow/credentials")
    au.add_argument("name")
    au.add_argument("--password", help="at least 12 characters (default: generated)")
    gr = sub.add_parser("grant", parents=[folder], help="give a user a permission on an experiment (a study) or "
                        "a registered model")
    gr.add_argument("name")
    gr.add_argument("--experiment", help="experiment (study) name or id")
    gr.add_argument("--model", help="registered model name (e.g. STUDY-adapter)")
    gr.add_argument("--permission", default="READ", choices=PERMISSIONS, help="default READ")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    layout = Layout(getattr(args, "dir", None) or default_dir())
    timeout_s = float(os.environ.get("LORA_HPO_MLFLOW_TIMEOUT_S", "120"))
    try:
        if args.command == "start":
            given = {k: getattr(args, k) for k in ("host", "port", "workers", "backend_uri", "artifacts", "auth",
                                                    "default_permission")}
            start(layout, given, timeout_s)
            show_url(layout, admin=False)  # the admin password is printed once, when made; `url` shows it
        elif args.command == "stop":
            stop(layout)
        elif args.command == "status":
            return status(layout)
        elif args.command == "url":
            show_url(layout)
        elif args.command == "add-user":
            check_login(args.name, args.password)  # before the server is asked: a bad name is bad anywhere
            add_user(*_admin(layout), args.name, args.password)
        elif args.command == "grant":
            grant(*_admin(layout), args.name, args.experiment, args.model, args.permission)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if args.command != "status" else 1
    return 0
