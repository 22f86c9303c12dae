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

import os

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
    if artifact_uri.startswith("models:/"):
        artifact_uri = model_source(artifact_uri, uri)
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, tracking_uri=uri, registry_uri=uri,
                                               dst_path=dst)


def model_source(models_uri: str, tracking_uri: str | None = None) -> str:
    """Where `models:/NAME@ALIAS[/PATH]` or `models:/NAME/VERSION[/PATH]` points, looked up in the given store.

    MLflow 3's download_artifacts resolves a models:/ URI in its global registry (the environment's or its
    default), whatever registry_uri it is given, so the version is looked up here with a bound client."""
    name, _, rest = models_uri[len("models:/"):].partition("/")
    c = client(tracking_uri)
    if "@" in name:
        name, alias = name.split("@", 1)
        version = c.get_model_version_by_alias(name, alias).version
    else:
        version, _, rest = rest.partition("/")
        if not version.isdigit():  # a stage or "latest": MLflow's own resolution (deprecated stages)
            return models_uri
    source = c.get_model_version_download_uri(name, version).rstrip("/")
    return f"{source}/{rest}" if rest else source
