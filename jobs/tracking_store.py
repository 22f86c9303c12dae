"""The one door to MLflow's tracking store, for every entry point (torch-free; mlflow imported when used).

    from jobs.tracking_store import resolve, client, download
    uri = resolve(args.tracking_uri)          # --tracking-uri, else $MLFLOW_TRACKING_URI, else the project's store
    c = client(uri)                           # an MlflowClient bound to that store (never MLflow's global one)
    folder = download("models:/tiny-nomad-adapter@champion", uri)   # artifacts read from *that* store

The project's default store is `sqlite:///mlruns/mlflow.db` (relative to the working directory, the project
folder), not MLflow's own default (`./mlflow.db`): the orchestrator, `python -m evaluation`, the preference
report and `jobs.adapter.load_adapter` all read and write the same store unless told otherwise. Nothing here
changes the process environment: the URI is passed explicitly to each client.

    check_store(uri)                          # preflight: StoreError (one line, naming the fix) within seconds
    os.environ.update(http_settings())        # MLflow's HTTP client: fail fast instead of ~250 s of retries

`check_store` answers within `timeout_s` (default STORE_TIMEOUT_S = 15 s, the whole check's budget). A server
that is down refuses the connection and is reported at once; the budget bounds the wait for one that accepts
connections but does not answer (a hung process, a black-holed address). A healthy server answers its two
probes in milliseconds; a busy one on a loaded login node (several studies starting at once, as in the tests
here) was seen to need more than 5 s. It checks what a study needs before anything is
written or submitted: an http(s) server answers, is MLflow, accepts the credentials (MLflow's own client
rules: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials) and reaches its
database; a sqlite file can be written; a database URI (postgresql://...) can be connected to.

MLflow's HTTP client retries a failed request MLFLOW_HTTP_REQUEST_MAX_RETRIES times (7) with exponential
backoff (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR 2, capped at 120 s: sleeps 0, 4, 8, 16, 32, 64, 120 s, 244 s in
all) and waits MLFLOW_HTTP_REQUEST_TIMEOUT (120 s) for each answer; 5xx answers (a server whose database is
down) are retried the same way. These variables are read at every request, by the REST stores and by the
proxied-artifact repository alike, so `http_settings()` returns values to put into a process's environment
(only those the user has not set: an explicit choice wins); `bounded_http()` applies them for a block.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve(explicit: str | None = None) -> str:
    """The tracking URI to use: the explicit one, else $MLFLOW_TRACKING_URI, else the project's default."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def client(uri: str | None = None):
    """An MlflowClient bound to `uri` (resolved as above)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=resolve(uri))


def download(artifact_uri: str, tracking_uri: str | None = None, dst: str | None = None) -> str:
    """Download `runs:/...`, `models:/...` or `mlflow-artifacts:/...` from the given store; returns a local path."""
    import mlflow.artifacts

    uri = resolve(tracking_uri)
    if artifact_uri.startswith("models:/"):  # MLflow resolves these through its global registry URI: do it here
        artifact_uri = model_source(artifact_uri, uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri, registry_uri=uri,
                                               dst_path=dst)


def model_source(models_uri: str, tracking_uri: str | None = None) -> str:
    """Where `models:/NAME@ALIAS[/PATH]`, `models:/NAME/VERSION[/PATH]` or `models:/NAME/latest` points, looked up
    in the given store.

    MLflow 3's download_artifacts resolves a models:/ URI in its global registry (the environment's or its
    default), whatever registry_uri it is given, so the version is looked up here with a bound client."""
    name, _, rest = models_uri[len("models:/"):].partition("/")
    c = client(tracking_uri)
    if "@" in name:
        name, alias = name.split("@", 1)
        version = c.get_model_version_by_alias(name, alias).version
    else:
        version, _, rest = rest.partition("/")
        if version == "latest":
            version = str(max(int(v.version) for v in c.search_model_versions(f"name = '{name}'")))
        elif not version.isdigit():  # a stage (deprecated): MLflow's own resolution
            return models_uri
    source = c.get_model_version_download_uri(name, version).rstrip("/")
    return f"{source}/{rest}" if rest else source


# ------------------------------------------------------------------------------------------- preflight
STORE_TIMEOUT_S = 15.0


class StoreError(RuntimeError):
    """The tracking store cannot be used as given; the message (one line) names the fix."""


DATABASES = ("postgresql", "postgres", "mysql", "mssql", "oracle")


def check_store(uri: str | None = None, timeout_s: float = STORE_TIMEOUT_S, *, username: str | None = None,
                password: str | None = None, experiment: str | None = None) -> str:
    """Raise StoreError within about `timeout_s` if the store cannot be used; return the resolved URI.

    Credentials are MLflow's (environment, else ~/.mlflow/credentials) unless `username`/`password` are given.
    With `experiment`, a server must also let this login write that experiment (one that another user created
    under the same name is refused before any job runs). Nothing is written (a sqlite check creates and removes
    a probe file at most; the store itself is made by ensure_local_store when a study starts)."""
    uri = resolve(uri)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri, timeout_s, username, password)
        if experiment:
            _check_experiment(uri, experiment, timeout_s, username, password)
    elif scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            raise StoreError(f"tracking URI {uri!r} is not a SQLite URI MLflow reads: write sqlite:///RELATIVE/PATH.db "
                             "or sqlite:////ABSOLUTE/PATH.db (three or four slashes)")
        _check_sqlite(uri)
    elif scheme == "file":
        _check_writable(Path(urlparse(uri).path), uri, "a folder")
    elif scheme.split("+")[0] in DATABASES:
        check_database(uri, timeout_s)
    else:
        raise StoreError(f"tracking URI {uri!r} is not one MLflow can use here (scheme {scheme or 'missing'!r}): "
                         "write sqlite:///PATH/mlflow.db, http(s)://HOST:PORT or a database URI "
                         "(postgresql://...)")
    return uri


def _check_experiment(uri: str, name: str, timeout_s: float, username: str | None, password: str | None) -> None:
    """An experiment of this name that exists must be writable by this login (else its every write fails)."""
    import time
    from urllib.parse import quote

    deadline = time.monotonic() + timeout_s
    got = _get(uri, f"/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(name)}", deadline, timeout_s,
               username, password)
    if got.status_code == 404 or _json(got).get("error_code") == "RESOURCE_DOES_NOT_EXIST":
        return  # the study creates it
    user = username or _mlflow_username()
    if got.status_code in (401, 403):
        raise StoreError(f"the experiment {name!r} on {uri} belongs to someone else: user {user!r} may not read it "
                         f"(HTTP {got.status_code}): pick another --study name, or ask its owner to grant you "
                         "EDIT (python -m orchestrator server grant)")
    exp_id = (_json(got).get("experiment") or {}).get("experiment_id")
    if not exp_id:
        return
    probe = _request(uri, "/api/2.0/mlflow/experiments/set-experiment-tag", "POST", deadline, timeout_s, username,
                     password, json={"experiment_id": exp_id, "key": "lora_hpo.writable", "value": "true"})
    if probe.status_code in (401, 403):
        raise StoreError(f"the experiment {name!r} on {uri} belongs to someone else: user {user!r} may not write it "
                         f"(HTTP {probe.status_code}): pick another --study name, or ask its owner to grant you "
                         "EDIT (python -m orchestrator server grant)")


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _check_server(uri: str, timeout_s: float, username: str | None, password: str | None) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    health = _get(uri, "/health", deadline, timeout_s, username, password)
    if health.status_code != 200 or health.text.strip() != "OK":
        raise StoreError(f"{uri} answers but is not an MLflow tracking server (GET /health gave HTTP "
                         f"{health.status_code}): fix --tracking-uri / MLFLOW_TRACKING_URI (e.g. http://HOST:5000)")
    # A real API call: /health says OK even when the server's database is gone, and needs no login.
    api = _get(uri, "/api/2.0/mlflow/experiments/search?max_results=1", deadline, timeout_s, username, password)
    user = username or _mlflow_username()
    if api.status_code == 401:
        if user:
            raise StoreError(f"the MLflow server at {uri} rejected the login of user {user!r} (HTTP 401): fix "
                             "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or ~/.mlflow/credentials")
        raise StoreError(f"the MLflow server at {uri} needs a login (HTTP 401): set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD, or put them in ~/.mlflow/credentials (the server's admin "
                         "creates users: python -m orchestrator server add-user NAME)")
    if api.status_code == 403:
        raise StoreError(f"user {user!r} may not use the MLflow server at {uri} (HTTP 403): ask its admin for "
                         "access (python -m orchestrator server grant)")
    if api.status_code >= 500:
        raise StoreError(f"the MLflow server at {uri} answers but its store fails (HTTP {api.status_code}: "
                         f"{_one_line(_message(api))}): its database is probably down; check it with python -m "
                         "orchestrator server status (or the server's log) and restart it")
    body = _json(api)
    # {}: no experiment visible; a page of experiments the login may not see, filtered away, leaves only the token
    if api.status_code != 200 or not set(body) <= {"experiments", "next_page_token"}:
        raise StoreError(f"{uri} answers /health but not MLflow's REST API (HTTP {api.status_code}): fix "
                         "--tracking-uri / MLFLOW_TRACKING_URI (the address of an MLflow tracking server)")


def _mlflow_username() -> str | None:
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username


def _json(response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {"not json": True}
    return body if isinstance(body, dict) else {"not a dict": True}


def _message(response) -> str:
    return str(_json(response).get("message") or response.text or response.reason)


def _get(uri: str, endpoint: str, deadline: float, budget: float, username: str | None, password: str | None):
    """One GET with MLflow's client (its TLS and credential rules), no retries, bounded by the deadline."""
    return _request(uri, endpoint, "GET", deadline, budget, username, password)


def _request(uri: str, endpoint: str, method: str, deadline: float, budget: float, username: str | None,
             password: str | None, **kwargs):
    import time

    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    if username is not None:
        creds.username, creds.password, creds.token = username, password, None
    left = max(deadline - time.monotonic(), 0.1)
    try:
        return http_request(creds, endpoint, method, max_retries=0, backoff_factor=0, backoff_jitter=0,
                            retry_codes=(), timeout=left, raise_on_status=False, **kwargs)
    except MlflowException as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, requests.RequestException):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, requests.Timeout) or "timed out" in str(e).lower():
            raise StoreError(f"the MLflow server at {uri} did not answer within {budget:g} s: check that "
                             "it is up (python -m orchestrator server status) and reachable from here, or fix "
                             "--tracking-uri / MLFLOW_TRACKING_URI") from None
        raise StoreError(f"no MLflow server answers at {uri} ({_reason(cause or e)}): start it (python -m "
                         "orchestrator server start) or fix --tracking-uri / MLFLOW_TRACKING_URI") from None


def _reason(error: BaseException) -> str:
    text = str(error)
    for known in ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable",
                  "Temporary failure in name resolution", "certificate verify failed"):
        if known in text:
            return known.lower()
    return _one_line(text, 120)


def _check_sqlite(uri: str) -> None:
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if path in ("", ":memory:"):
        return
    db = Path(path)
    if db.exists() and (not db.is_file() or not os.access(db, os.R_OK | os.W_OK)):
        raise StoreError(f"cannot write the MLflow store {uri}: {db} is not a writable file: fix its "
                         "permissions or choose another with --tracking-uri sqlite:///PATH")
    _check_writable(db.parent, uri, "the database's folder")


def _check_writable(folder: Path, uri: str, what: str) -> None:
    """The folder, or the nearest existing folder above it, must take a new file (probed, then removed)."""
    import tempfile

    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    fix = "choose a writable place with --tracking-uri (e.g. sqlite:///PATH/mlflow.db) or fix its permissions"
    if not existing.is_dir():
        raise StoreError(f"cannot write the MLflow store {uri}: {existing} is a file, not a folder: {fix}")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".lora-hpo-probe-"):
            pass
    except OSError as e:
        raise StoreError(f"cannot write the MLflow store {uri}: {what} {existing} is not writable "
                         f"({e.strerror}): {fix}") from None


def check_database(uri: str, timeout_s: float = STORE_TIMEOUT_S) -> None:
    """Connect to a SQLAlchemy database URI once (bounded by timeout_s); StoreError naming the fix if not."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    try:
        url = sqlalchemy.engine.make_url(uri)
    except sqlalchemy.exc.ArgumentError:
        raise StoreError(f"{uri!r} is not a database URI: write it as DIALECT[+DRIVER]://USER:PASSWORD@HOST:PORT/DB "
                         "(e.g. postgresql+psycopg2://mlflow:SECRET@dbhost:5432/mlflow)") from None
    shown = url.render_as_string(hide_password=True)
    args = {"connect_timeout": max(1, round(timeout_s))} if url.get_backend_name() in ("postgresql", "mysql") else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args, poolclass=NullPool)
    except ImportError as e:
        raise StoreError(f"no Python driver for {shown} ({e.name or e} is not installed): pip install "
                         "'lora-hpo[server]' (psycopg2-binary) and write postgresql+psycopg2://..., or install "
                         f"{e.name or 'the driver'}") from None
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = _one_line(getattr(e, "orig", None) or e, 160)
        raise StoreError(f"cannot reach the database {shown} ({reason}): check host, port, user, password and "
                         "database name in the URI, and that the database server is up") from None
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------------- local store
def ensure_local_store(uri: str) -> None:
    """Make sure a `sqlite:///` store exists and is whole, created atomically on first use.

    MLflow creates its tables on first connection; a process killed meanwhile leaves a half-made file that
    every later use rejects ("table ... already exists"), and two first uses at once race in the migration.
    So a new store is made in a private file and linked into place (an atomic create-if-absent: the loser of
    a race uses the winner's file), and a half-made store that holds no run yet is moved aside and remade."""
    if not uri.startswith("sqlite:///"):
        return
    path = Path(uri[len("sqlite:///"):])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"tracking store {uri}: cannot create its folder ({e.strerror}): give a writable "
                         "--tracking-uri") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StoreError(f"tracking store {uri}: {path} is not writable: give a writable --tracking-uri")
    if path.exists():
        if _sqlite_whole(path):
            return
        if _sqlite_runs(path):
            raise StoreError(f"tracking store {path} is damaged (its schema is incomplete) and holds runs: "
                             "restore it from a backup, or give another --tracking-uri")
        os.replace(path, path.with_name(f"{path.name}.broken-{int(time.time())}"))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        template = _empty_store_template()
        if template is not None:
            shutil.copyfile(template, tmp)
        else:
            client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates every table
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


def _empty_store_template() -> Path | None:
    """An empty, whole store of this MLflow version, made once per user cache ($LORA_HPO_CACHE/mlflow-stores):
    a new store is a copy of it instead of MLflow's migrations run again (seconds each). None where the cache
    cannot be written (the store is then made by MLflow directly)."""
    import mlflow

    root = Path(os.environ.get("LORA_HPO_CACHE", Path.home() / ".cache" / "lora-hpo")) / "mlflow-stores"
    template = root / f"empty-mlflow-{mlflow.__version__}.db"
    if template.exists() and _sqlite_whole(template):
        return template
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{template.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"
        client(f"sqlite:///{tmp}").search_experiments(max_results=1)
        os.replace(tmp, template)
    except OSError:
        return None
    return template


def _sqlite_tables(path: Path) -> set[str]:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            return {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    except sqlite3.DatabaseError:
        return set()


def _sqlite_whole(path: Path) -> bool:
    import sqlite3

    if "alembic_version" not in _sqlite_tables(path):
        return False
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return bool(db.execute("select version_num from alembic_version").fetchall())


def _sqlite_runs(path: Path) -> bool:
    import sqlite3

    if "runs" not in _sqlite_tables(path):
        return False
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
        return bool(db.execute("select count(*) from runs").fetchone()[0])


NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "fuse.sshfs", "glusterfs", "ceph")


def filesystem_of(path: str | Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system holding `path` (the longest mount point above it), or None if unknown."""
    target = os.path.realpath(Path(path).expanduser())
    best, kind = "", None
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3:
            point = parts[1].replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


def network_store_warning(uri: str, mounts: str = "/proc/mounts") -> str | None:
    """A warning when a SQLite store sits on a network file system (whose locks SQLite cannot trust)."""
    if not uri.startswith("sqlite:///"):
        return None
    kind = filesystem_of(Path(uri[len("sqlite:///"):]).parent, mounts)
    if kind and (kind in NETWORK_FILESYSTEMS or kind.startswith("nfs")):
        return (f"warning: the MLflow store {uri} is on {kind}: SQLite on a network file system can lose or corrupt "
                "writes; for a lab run a tracking server (python -m orchestrator server start) and use its URL")
    return None


# ------------------------------------------------------------------------------------------- MLflow's HTTP
def http_settings(retries: int = 0, timeout_s: int = 30, environ=None) -> dict[str, str]:
    """Environment entries that bound MLflow's HTTP client: `retries` quick retries (after 0, 2, 4 ... s)
    instead of 7 slow ones (244 s of sleep in all), `timeout_s` per connect / read instead of 120 s. Entries
    the user has set are left out.

    `retries=0` suits a writer with its own durable queue (a failed write is queued, not retried in place);
    one-shot commands may take 2. `timeout_s` bounds each socket wait, not a whole transfer, so a large
    artifact upload is not cut by it."""
    environ = os.environ if environ is None else environ
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(retries)), "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout_s))}
    return {k: v for k, v in wanted.items() if k not in environ}


@contextmanager
def bounded_http(retries: int = 0, timeout_s: int = 30):
    """Apply http_settings() to this process's environment for a block, then restore it (not thread-local:
    meant for a command's or a writer thread's whole life)."""
    settings = http_settings(retries, timeout_s)
    os.environ.update(settings)
    try:
        yield settings
    finally:
        for key in settings:
            os.environ.pop(key, None)
