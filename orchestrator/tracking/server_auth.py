"""MLflow's basic-auth app for the lab's server: its settings file, the admin login, users and permissions.

    python -m orchestrator server start --auth          # writes auth/basic_auth.ini, makes the admin login
    python -m orchestrator server add-user alice        # prints alice's ~/.mlflow/credentials lines
    python -m orchestrator server grant bob --experiment alice-study --permission READ

Users are MLflow's (its REST API, called with the admin login kept 0600 under <dir>/auth); a user owns
(MANAGE) the experiments and registered models they create and sees others' only as `default_permission`
or a grant allows. Clients log in the way MLflow's client does: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, else ~/.mlflow/credentials.
"""
from __future__ import annotations

import configparser
import os
import secrets
import sys
from pathlib import Path

from orchestrator.tracking.postgres import ServerError

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")
ADMIN = "admin"
# The auth app's REST routes (mlflow/server/auth/routes.py; importing that module costs seconds).
CREATE_USER = "/api/2.0/mlflow/users/create"
GRANT = "/api/3.0/mlflow/users/permissions/grant"
GET_EXPERIMENT = "/api/2.0/mlflow/experiments/get-by-name"


def admin_login(ini: Path) -> tuple[str, str] | None:
    if not ini.exists():
        return None
    parsed = configparser.ConfigParser()
    parsed.read(ini)
    return parsed["mlflow"]["admin_username"], parsed["mlflow"]["admin_password"]


def write_private(path: Path, text: str) -> None:
    """Write a secret: its folder 0700, the file 0600 from its creation."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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
        "admin_password": login[1], "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }.items()))
    secret = folder / "secret_key"
    if not secret.exists():
        write_private(secret, secrets.token_hex(32))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secret.read_text()}


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
    password = password or secrets.token_urlsafe(18)
    if len(password) < 12:
        raise ServerError("--password must have at least 12 characters (MLflow's rule); omit it to get one made")
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
