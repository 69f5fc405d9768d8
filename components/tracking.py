"""MLflow connection helpers shared by the stages that track or register.

The tracking URI comes from params (`tracking.uri`), unless MLFLOW_TRACKING_URI is set in the
environment: servers and their credentials are deployment settings, not project settings.
Credentials never reach logs, params or tags: use `redact` before showing a URI.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from components.config import TrackingConfig


def resolve_tracking_uri(config: TrackingConfig, workspace: str | Path | None = None) -> str:
    """The URI to use; a relative SQLite path is anchored at the workspace (cwd by default)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or config.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        base = Path(workspace) if workspace else Path.cwd()
        uri = prefix + str((base / uri[len(prefix):]).resolve())
    return uri


def redact(uri: str) -> str:
    """Drop user and password from a URI before it is logged or shown."""
    parts = urlsplit(uri)
    if not (parts.username or parts.password):
        return uri
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


# Clean tracking URI -> how messages show it (the user's URI, credentials as ***), and whether the
# credential variables were set from a URI (so another server never receives them).
_SHOWN: dict[str, str] = {}
_CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_credentials_from_uri = False


def use_tracking_uri(uri: str) -> str:
    """Point MLflow at `uri`; a `user:password@` in it moves to MLflow's credential variables.

    MLflow prints and stores the tracking URI in places we do not control (the "View run at"
    links on stdout, for one), so it must never hold the secret. Returns the URI MLflow now uses.
    """
    import mlflow

    global _credentials_from_uri
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https") and (parts.username or parts.password):
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username or "")
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password or "")
        _credentials_from_uri = True
        host = f"{parts.hostname}:{parts.port}" if parts.port else (parts.hostname or "")
        clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
        _SHOWN[clean] = redact(uri)
        uri = clean
    elif _credentials_from_uri:
        for name in _CREDENTIAL_VARS:
            os.environ.pop(name, None)
        _credentials_from_uri = False
    mlflow.set_tracking_uri(uri)
    return uri


def shown_uri(uri: str | None = None) -> str:
    """The tracking URI (default: MLflow's current one) as messages may show it: no credentials."""
    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    return _SHOWN.get(uri) or redact(uri)


def probe_server(uri: str, timeout_s: float = 10.0) -> None:
    """Raise ConnectionError (naming host:port, never credentials) when an http(s) tracking server is down.

    One quick request of our own: MLflow's client would otherwise retry a refused connection for
    minutes (its backoff is sized for rate limits) before the stage's own retries even start.
    Any HTTP answer counts as reachable; only network failures count as down.
    """
    import requests

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    health = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/") + "/health", "", ""))
    try:
        requests.get(health, timeout=timeout_s, allow_redirects=False)
    except requests.Timeout:
        raise ConnectionError(f"no answer from {netloc} within {timeout_s:g} s") from None
    except requests.RequestException as exc:
        known = ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable")
        reason = next((r for r in known if r in str(exc)), "cannot connect")
        raise ConnectionError(f"{reason.lower()}: {netloc}") from None


def setup_mlflow(config: TrackingConfig, workspace: str | Path | None = None) -> str:
    """Point MLflow at the tracking store and make sure the experiment exists; return its id."""
    import mlflow

    uri = use_tracking_uri(resolve_tracking_uri(config, workspace))
    probe_server(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(config.experiment, artifact_location=local_artifact_location(uri))


def local_artifact_location(uri: str) -> str | None:
    """With a SQLite store, artifacts go to `mlruns/` beside the database, not into whatever folder is current.

    A tracking server decides its own artifact location (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
