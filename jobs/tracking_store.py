"""The one door to MLflow's tracking store, for every entry point (torch-free; mlflow imported when used).

    from jobs.tracking_store import resolve, client, download
    uri = resolve(args.tracking_uri)          # --tracking-uri, else $MLFLOW_TRACKING_URI, else the project's store
    c = client(uri)                           # an MlflowClient bound to that store (never MLflow's global one)
    folder = download("models:/tiny-nomad-adapter@champion", uri)   # artifacts read from *that* store

The project's default store is `sqlite:///mlruns/mlflow.db` (relative to the working directory, the project
folder), not MLflow's own default (`./mlflow.db`): the orchestrator, `python -m evaluation`, the preference
report and `jobs.adapter.load_adapter` all read and write the same store unless told otherwise. Nothing here
changes the process environment: the URI is passed explicitly to each client.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path

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
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri, registry_uri=uri,
                                               dst_path=dst)


class StoreError(RuntimeError):
    """The tracking store cannot be used; the one-line message names the problem and the fix."""


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
        client(f"sqlite:///{tmp}").search_experiments(max_results=1)  # creates every table
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)


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


def check_store(uri: str, timeout_s: float = 10.0) -> None:
    """A one-line StoreError, within about `timeout_s`, when the store cannot be used: a local SQLite file is
    made (atomically) or checked; an http(s) server must answer as MLflow, and accept the credentials."""
    if uri.startswith("sqlite:///"):
        ensure_local_store(uri)
    elif uri.startswith(("http://", "https://")):
        _check_http(uri.rstrip("/"), timeout_s)
    elif "://" not in uri and not uri.startswith("file:"):
        raise StoreError(f"tracking URI {uri!r} is not one MLflow can use: write sqlite:///path/mlflow.db or "
                         "http://host:port")


def _check_http(uri: str, timeout_s: float) -> None:
    import requests

    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    try:
        r = requests.get(f"{uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, auth=auth,
                         timeout=timeout_s)
    except requests.RequestException as e:
        raise StoreError(f"tracking server {uri} does not answer within {timeout_s:.0f} s "
                         f"({type(e).__name__}): start it, or check --tracking-uri") from None
    if r.status_code in (401, 403):
        raise StoreError(f"tracking server {uri} refused the credentials (HTTP {r.status_code}): set "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)")
    try:
        body = r.json()
    except ValueError:
        body = None
    if r.status_code != 200 or not isinstance(body, dict):
        raise StoreError(f"{uri} answers (HTTP {r.status_code}) but not as an MLflow tracking server: check "
                         "--tracking-uri")
