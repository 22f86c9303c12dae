"""A private PostgreSQL for the lab's MLflow server: one data folder, a Unix socket only, its own pid file.

    python -m orchestrator server start       # starts it (orchestrator/tracking/server.py), then `mlflow server` on it

Debian's `postgresql` package provides the binaries (/usr/lib/postgresql/<version>/bin, or LORA_HPO_PG_BIN);
they are apt-installed when missing and running as root (the package's own cluster is kept from starting).
PostgreSQL refuses to run as root, so as root it runs as the `postgres` system user, otherwise as the caller.
It opens no TCP port: it listens on a socket in <dir>/pg/run (mode 0700), which only its owner and root can
reach. Even so every role logs in with a password (scram-sha-256 for every connection in pg_hba.conf: as root,
the `postgres` system account owns that socket, and must not read the users' password hashes): the
superuser `mlflow` gets a generated password, kept in <dir>/auth/pgpass (0600, folder 0700) and handed to
`mlflow server` as PGPASSFILE, never on a command line. A cluster made by an older version (trust) is switched
over on its next start. Databases: `mlflow` (runs and registry) and `mlflow_auth` (users and permissions of
MLflow's basic-auth app, which wants a database of its own).
"""
from __future__ import annotations

import getpass
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PORT = 5432  # names the socket file only (.s.PGSQL.5432 in a private folder): nothing listens on TCP
DB_USER = "mlflow"
DATABASES = ("mlflow", "mlflow_auth")


HBA = ("# written by lora-hpo (orchestrator/tracking/postgres.py): every role logs in with its password\n"
       "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n")


class ServerError(RuntimeError):
    """The server cannot be started or used as asked; the message (one line) names the fix."""


def write_private(path: Path, text: str, folder_mode: int | None = 0o700) -> None:
    """Write a secret: the file 0600 from its creation (an existing one is made 0600 before it is written), its
    folder `folder_mode` (None: left as it is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder_mode is not None:
        path.parent.chmod(folder_mode)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _pgpass_field(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def pgpass_line(user: str, password: str, host: str = "*", port: str = "*", database: str = "*") -> str:
    """One line of a libpq password file (https://www.postgresql.org/docs/current/libpq-pgpass.html)."""
    return ":".join(_pgpass_field(str(v)) if v != "*" else "*" for v in (host, port, database, user, password)) + "\n"


def pgpass_password(path: Path, user: str) -> str | None:
    """The password of the first line for `user` in a password file written by pgpass_line, if any."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields, field, escaped = [], "", False
        for char in line:
            if escaped:
                field, escaped = field + char, False
            elif char == "\\":
                escaped = True
            elif char == ":" and len(fields) < 4:
                fields, field = fields + [field], ""
            else:
                field += char
        if len(fields) == 4 and fields[3] == user:
            return field
    return None


def split_password(uri: str) -> tuple[str, str | None]:
    """A SQLAlchemy database URI split: (the URI without its password, the password or None); a URI SQLAlchemy
    cannot read is kept whole (the preflight refuses it)."""
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        return uri, None
    if url.password is None:
        return uri, None
    if "\n" in str(url.password):
        raise ServerError("--backend-uri: the password holds a line break, which no password file can keep")
    bare = sqlalchemy.engine.URL.create(url.drivername, url.username, None, url.host, url.port, url.database, url.query)
    return bare.render_as_string(hide_password=False), str(url.password)


def with_password(uri: str, password: str | None) -> str:
    import sqlalchemy

    return sqlalchemy.engine.make_url(uri).set(password=password).render_as_string(hide_password=False) \
        if password else uri


def uri_user(uri: str) -> str:
    """The user a database URI logs in as (libpq's default: the OS user); "" for what is no URI."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(uri).username or getpass.getuser()
    except sqlalchemy.exc.ArgumentError:
        return ""


def binaries() -> Path | None:
    """The folder with initdb and postgres: $LORA_HPO_PG_BIN, Debian's newest, or the PATH's."""
    candidates = [os.environ.get("LORA_HPO_PG_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    which = shutil.which("initdb")
    candidates += [str(Path(which).resolve().parent)] if which else []
    for folder in filter(None, candidates):
        if all(os.access(Path(folder, name), os.X_OK) for name in ("initdb", "postgres")):
            return Path(folder)
    return None


def ensure_installed(log_folder: Path) -> Path:
    """The binaries' folder, installing Debian's postgresql package first where missing and allowed."""
    found = binaries()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ServerError("PostgreSQL is not installed: ask an administrator to apt-get install postgresql (or "
                          "set LORA_HPO_PG_BIN to its bin folder), or give --backend-uri for an existing database")
    log_folder.mkdir(parents=True, exist_ok=True)
    apt_log = log_folder / "apt.log"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with _services_blocked(), open(apt_log, "w") as out:
        for command in (["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]):
            if subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
                raise ServerError(f"{' '.join(command)} failed (log: {apt_log}): install postgresql yourself, "
                                  "or give --backend-uri for an existing database")
    found = binaries()
    if not found:
        raise ServerError(f"postgresql was installed but initdb/postgres were not found (log: {apt_log}): "
                          "set LORA_HPO_PG_BIN to the folder that has them")
    return found


class _services_blocked:
    """A policy-rc.d that forbids starting services while apt installs (the package would start its own
    cluster); whatever policy was there before is put back."""
    policy = Path("/usr/sbin/policy-rc.d")

    def __enter__(self):
        self.saved = self.policy.read_bytes() if self.policy.exists() else None
        self.mode = self.policy.stat().st_mode if self.policy.exists() else None
        self.policy.write_text("#!/bin/sh\nexit 101\n")
        self.policy.chmod(0o755)

    def __exit__(self, *exc):
        if self.saved is None:
            self.policy.unlink(missing_ok=True)
        else:
            self.policy.write_bytes(self.saved)
            self.policy.chmod(self.mode)


@dataclass
class Postgres:
    """The private instance under `folder` (<dir>/pg): data/, run/ (socket), its log in `log`, the superuser's
    password in `passfile` (default <dir>/auth/pgpass)."""
    folder: Path
    log: Path
    passfile: Path | None = None

    def __post_init__(self):
        self.passfile = self.passfile or self.folder.parent / "auth" / "pgpass"

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "run"

    def uri(self, database: str = "mlflow") -> str:
        """SQLAlchemy URI over the socket (psycopg2 named: SQLAlchemy 2.1 would pick psycopg 3 otherwise)."""
        return (f"postgresql+psycopg2://{DB_USER}@/{database}?host={quote(str(self.socket_dir), safe='/')}"
                f"&port={PORT}")

    # ------------------------------------------------------------------------------------------- state
    def pid(self) -> int | None:
        """The postmaster's pid from its own pid file, if that process is alive and is this instance."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if str(self.data).encode() in cmdline and Path(cmdline[0].decode()).name == "postgres" else None

    # ------------------------------------------------------------------------------------------- start
    def start(self, timeout_s: float, log=print) -> None:
        """Initialise (first time), start (unless running), wait until it answers, require passwords (a trust
        cluster of an older version is switched over), create the databases."""
        bin_dir = ensure_installed(self.log.parent)
        owner = _owner()
        self._layout(owner)
        password = pgpass_password(self.passfile, DB_USER)
        initialised = (self.data / "PG_VERSION").exists()
        if initialised and password is None and (self.data / "pg_hba.conf").read_text() == HBA:
            raise ServerError(f"the PostgreSQL superuser's password file {self.passfile} is missing: restore it from "
                              f"a backup of {self.passfile.parent}, or start over with a new --dir")
        if password is None:  # kept before it is used (initdb, or an older version's cluster): a crash loses nothing
            password = secrets.token_urlsafe(24)
            write_private(self.passfile, pgpass_line(DB_USER, password))
        if not initialised:
            log(f"initialising PostgreSQL in {self.data}")
            self._initdb(bin_dir, owner, password)
        if self.pid() is None:
            with open(self.log, "a") as out:
                process = subprocess.Popen(
                    [str(bin_dir / "postgres"), "-D", str(self.data), "-c", "listen_addresses=", "-c",
                     f"unix_socket_directories={self.socket_dir}", "-c", f"port={PORT}"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder,
                    start_new_session=True, **_as_user(owner))
            self._wait(process, timeout_s)
        self._require_passwords(password, owner, log)
        self._create_databases()

    def _initdb(self, bin_dir: Path, owner, password: str) -> None:
        """initdb with scram-sha-256 everywhere; the password reaches it in a file only its owner reads, removed
        at once."""
        pwfile = self.folder / ".initdb-password"
        write_private(pwfile, password + "\n")
        try:
            if owner is not None:
                os.chown(pwfile, owner.pw_uid, owner.pw_gid)
            self._run_as(owner, [str(bin_dir / "initdb"), "-D", str(self.data), f"--username={DB_USER}",
                                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-locale"],
                         "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        _overwrite(self.data / "pg_hba.conf", HBA)

    def _require_passwords(self, password: str, owner, log) -> None:
        """pg_hba.conf as HBA; a cluster that trusted local connections first gets the superuser's password."""
        hba = self.data / "pg_hba.conf"
        if hba.read_text() == HBA:
            return
        log(f"PostgreSQL in {self.data}: requiring a password for every role (pg_hba.conf rewritten)")
        connection = self._connect()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET password_encryption = 'scram-sha-256'")
                cursor.execute(f'ALTER ROLE "{DB_USER}" WITH PASSWORD %s', (password,))
                _overwrite(hba, HBA)
                cursor.execute("SELECT pg_reload_conf()")
        finally:
            connection.close()

    def _layout(self, owner: pwd.struct_passwd | None) -> None:
        for folder in (self.folder, self.socket_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            if owner is not None:
                os.chown(folder, owner.pw_uid, owner.pw_gid)
        if owner is not None and not _reachable_by_others(self.folder.parent):
            raise ServerError(f"PostgreSQL runs as the {owner.pw_name} user, which cannot reach {self.folder} (a "
                              "folder above it is private): choose --dir under a folder others may enter, e.g. "
                              "/var/lib/lora-hpo/mlflow-server")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.parent.chmod(0o700)  # PostgreSQL writes its log through the descriptor it is given

    def _run_as(self, owner, command: list[str], what: str) -> None:
        with open(self.log, "a") as out:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  cwd=self.folder, **_as_user(owner))
        if done.returncode != 0:
            raise ServerError(f"{what} failed (exit {done.returncode}); last lines of {self.log}: {_tail(self.log)}")

    def _wait(self, process: subprocess.Popen, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if process.poll() is not None:
                raise ServerError(f"PostgreSQL exited ({process.returncode}); last lines of {self.log}: "
                                  f"{_tail(self.log)}")
            if time.monotonic() > deadline:
                raise ServerError(f"PostgreSQL did not answer within {timeout_s:g} s (log: {self.log})")
            time.sleep(0.2)

    def _connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=str(self.socket_dir), port=PORT, user=DB_USER, dbname=database,
                                password=pgpass_password(self.passfile, DB_USER), connect_timeout=3)

    def _answers(self) -> bool:
        import psycopg2

        try:
            self._connect().close()
            return True
        except psycopg2.OperationalError:
            return False

    def _create_databases(self) -> None:
        connection = self._connect()
        connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with connection.cursor() as cursor:
                for name in DATABASES:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cursor.fetchone() is None:
                        cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()

    # ------------------------------------------------------------------------------------------- stop
    def stop(self, timeout_s: float = 30.0, log=print) -> None:
        """Fast shutdown (SIGINT: sessions are ended, data is safe); SIGQUIT if it lingers."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGINT)
        if not _gone(pid, timeout_s):
            log(f"PostgreSQL (pid {pid}) did not stop within {timeout_s:g} s: sending SIGQUIT")
            os.kill(pid, signal.SIGQUIT)
            _gone(pid, 10.0)


def _overwrite(path: Path, text: str) -> None:
    """Replace a file's text, keeping its owner (postgres, for the cluster's files) and mode."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_TRUNC), "w") as f:
        f.write(text)


def _owner() -> pwd.struct_passwd | None:
    """As root, the `postgres` system user (created by Debian's package); otherwise None: the caller."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError("running as root, PostgreSQL needs the 'postgres' system user: apt-get install "
                          "postgresql creates it (or run the server as a normal user)") from None


def _as_user(owner: pwd.struct_passwd | None) -> dict:
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [],
            "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": owner.pw_dir, "LC_ALL": "C.UTF-8"}}


def _reachable_by_others(folder: Path) -> bool:
    """Every folder from / down to `folder` lets others pass (o+x)."""
    folder = folder.resolve()
    return all(p.stat().st_mode & 0o001 for p in [folder, *folder.parents])


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while Path(f"/proc/{pid}").exists():
        try:  # reap it if it is our child (a zombie still has a /proc entry)
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
