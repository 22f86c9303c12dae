"""MLflow's basic-auth app for the lab's server: its settings file, the admin login, users and permissions.

    python -m orchestrator server start --auth          # writes auth/basic_auth.ini, makes the admin login
    python -m orchestrator server add-user alice        # prints alice's ~/.mlflow/credentials lines
    python -m orchestrator server grant bob --experiment alice-study --permission READ

Users are MLflow's (its REST API, called with the admin login kept 0600 under <dir>/auth); a user owns
(MANAGE) the experiments and registered models they create and sees others' only as `default_permission`
or a grant allows. Clients log in the way MLflow's client does: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials. A user name is 1 to 64 letters, digits and . _ @ + -
(a ':' would end it in an HTTP login); a password 12 to 128 printable ASCII characters without spaces or '%'
(longer ones overflow HTTP headers; MLflow reads ~/.mlflow/credentials with configparser, where '%' is special).
Failed logins are throttled per user name: after MAX_FAILURES within WINDOW_S seconds, every login of that
name gets HTTP 429 (with Retry-After) for LOCK_S seconds, the right password included, whichever worker
answers (the counts live in auth/logins.db). This is the auth app's own extension point
(`authorization_function` in basic_auth.ini: authenticate_throttled wraps MLflow's basic-auth check), which
MLflow calls on its Flask and its FastAPI routes alike.
"""
from __future__ import annotations

import configparser
import math
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from pathlib import Path

from orchestrator.tracking.postgres import ServerError, write_private

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
ADMIN = "admin"
# The auth app's REST routes (mlflow/server/auth/routes.py; importing that module costs seconds).
CREATE_USER = "/api/2.0/mlflow/users/create"
GRANT = "/api/3.0/mlflow/users/permissions/grant"
GET_EXPERIMENT = "/api/2.0/mlflow/experiments/get-by-name"
AUTHORIZATION_FUNCTION = "orchestrator.tracking.server_auth:authenticate_throttled"
REPO = Path(__file__).resolve().parents[2]  # put on the server's PYTHONPATH: it imports the function above
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MIN_PASSWORD, MAX_PASSWORD = 12, 128
MAX_FAILURES, WINDOW_S, LOCK_S = 10, 300.0, 300.0


def admin_login(ini: Path) -> tuple[str, str] | None:
    if not ini.exists():
        return None
    parsed = configparser.ConfigParser()
    parsed.read(ini)
    return parsed["mlflow"]["admin_username"], parsed["mlflow"]["admin_password"]


def auth_env(folder: Path, users_db: str, default_permission: str, log) -> dict:
    """basic_auth.ini (the admin password is generated the first time) and the CSRF secret, under `folder`;
    returns the server's environment entries that point to them."""
    ini = folder / "basic_auth.ini"
    login = admin_login(ini)
    if login is None:
        login = (ADMIN, secrets.token_urlsafe(18))
        log(f"admin login created: {login[0]} / {login[1]}  (kept in {ini}; `server url` shows it)")
    write_private(ini, "[mlflow]\n" + "".join(f"{k} = {v}\n" for k, v in {
        "default_permission": default_permission, "database_uri": users_db, "admin_username": login[0],
        "admin_password": login[1], "authorization_function": AUTHORIZATION_FUNCTION,
    }.items()))
    secret = folder / "secret_key"
    if not secret.exists():
        write_private(secret, secrets.token_hex(32))
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text(),
            "LORA_HPO_LOGINS_DB": str(folder / "logins.db"), "PYTHONPATH": path}


# ------------------------------------------------------------------------------------------- accounts
def check_login(name: str, password: str | None) -> None:
    """A one-line ServerError for a name or password that could be created but never used to log in."""
    if not NAME.fullmatch(name):
        raise ServerError(f"user name {name!r} is not allowed: use 1 to 64 letters, digits and . _ @ + -, starting "
                          "with a letter or digit (a ':' would end the name in an HTTP login)")
    if password is None:
        return
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise ServerError(f"--password must have {MIN_PASSWORD} to {MAX_PASSWORD} characters, got {len(password)} "
                          "(longer ones overflow an HTTP header): omit it to get one made")
    if any(not "!" <= c <= "~" or c == "%" for c in password):
        raise ServerError("--password may hold only printable ASCII characters without spaces or '%' (others break "
                          "HTTP logins or ~/.mlflow/credentials): omit it to get one made")


class LoginThrottle:
    """Failed logins per user name in an SQLite file, shared by the server's worker processes."""

    def __init__(self, path: str, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S,
                 lock_s: float = LOCK_S):
        self.path, self.max_failures, self.window_s, self.lock_s = path, max_failures, window_s, lock_s
        self.local = threading.local()  # a connection per thread: the server's workers answer in threads

    def _db(self) -> sqlite3.Connection:
        if getattr(self.local, "db", None) is None:
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))  # made 0600 if it is new
            self.local.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self.local.db.execute("CREATE TABLE IF NOT EXISTS failures (user TEXT PRIMARY KEY, count INTEGER, "
                                  "since REAL, locked_until REAL)")
        return self.local.db

    def wait_s(self, user: str, now: float) -> float | None:
        """Seconds this user is still locked out (0.0: free, with failures on record; None: no failures)."""
        row = self._db().execute("SELECT locked_until FROM failures WHERE user = ?", (user,)).fetchone()
        return None if row is None else max(0.0, row[0] - now)

    def failed(self, user: str, now: float) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")  # one worker at a time counts
        try:
            row = db.execute("SELECT count, since, locked_until FROM failures WHERE user = ?", (user,)).fetchone()
            count, since, locked = (0, now, 0.0) if row is None or now - row[1] > self.window_s else row
            count += 1
            locked = now + self.lock_s if count >= self.max_failures else locked
            db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)", (user, count, since, locked))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def succeeded(self, user: str) -> None:
        self._db().execute("DELETE FROM failures WHERE user = ?", (user,))


_THROTTLES: dict[str, LoginThrottle] = {}  # per server process, by file


def authenticate_throttled():
    """The auth app's authorization function (see the module docstring): MLflow's basic-auth check, refused with
    HTTP 429 while the user name is locked out after repeated failures."""
    from flask import make_response, request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    login = request.authorization
    if login is None or not login.username:
        return authenticate_request_basic_auth()  # no credentials: MLflow's 401 asks for them
    path = os.environ["LORA_HPO_LOGINS_DB"]
    throttle = _THROTTLES.get(path) or _THROTTLES.setdefault(path, LoginThrottle(path))
    wait = throttle.wait_s(login.username, time.time())
    if wait:
        response = make_response(f"too many failed logins for user {login.username!r}: try again in "
                                 f"{math.ceil(wait)} s")
        response.status_code = 429
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    result = authenticate_request_basic_auth()
    if not isinstance(result, Authorization):
        throttle.failed(login.username, time.time())
    elif wait is not None:
        throttle.succeeded(login.username)
    return result


def _call(url: str, login: tuple[str, str], endpoint: str, method: str, **kwargs) -> dict:
    from mlflow.utils.rest_utils import MlflowHostCreds, http_request

    creds = MlflowHostCreds(url, username=login[0], password=login[1])
    response = http_request(creds, endpoint, method, max_retries=0, timeout=30, raise_on_status=False, **kwargs)
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        raise ServerError(f"{endpoint} refused (HTTP {response.status_code}): {' '.join(str(message).split())}")
    return response.json() if response.text.strip() else {}


def add_user(url: str, login: tuple[str, str], name: str, password: str | None) -> None:
    """Create a login; print the lines of its ~/.mlflow/credentials on stdout."""
    check_login(name, password)
    password = password or secrets.token_urlsafe(18)
    _call(url, login, CREATE_USER, "POST", json={"username": name, "password": password})
    print(f"server: user {name} created; they put these lines in ~/.mlflow/credentials (chmod 600), or export "
          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD:", file=sys.stderr)
    print(f"[mlflow]\nmlflow_tracking_username = {name}\nmlflow_tracking_password = {password}")


def _experiment_id(url: str, login: tuple[str, str], name: str) -> str:
    try:
        found = _call(url, login, GET_EXPERIMENT, "GET", params={"experiment_name": name})
    except ServerError as e:
        if "HTTP 404" in str(e):
            raise ServerError(f"no experiment {name!r} on this server: check the study name (a study's experiment "
                              "exists once it has started)") from None
        raise
    return found["experiment"]["experiment_id"]


def grant(url: str, login: tuple[str, str], name: str, experiment: str | None, model: str | None,
          permission: str) -> None:
    """Give user `name` a permission on an experiment (name or id) and/or a registered model."""
    if permission not in PERMISSIONS:
        raise ServerError(f"--permission must be one of {', '.join(PERMISSIONS)}, got {permission!r}")
    if not experiment and not model:
        raise ServerError("grant needs --experiment STUDY (or its id) and/or --model REGISTERED_MODEL")
    targets = [("experiment", experiment if experiment.isdigit() else _experiment_id(url, login, experiment))] \
        if experiment else []
    targets += [("registered_model", model)] if model else []
    for kind, resource in targets:
        _call(url, login, GRANT, "POST", json={"username": name, "resource_type": kind, "resource_id": resource,
                                               "permission": permission})
        print(f"server: {name}: {permission} on {kind} {resource}", file=sys.stderr)
