"""MLflow connection helpers shared by the stages that track or register.

The tracking URI comes from params (`tracking.uri`), unless MLFLOW_TRACKING_URI is set in the
environment: servers and their credentials are deployment settings, not project settings.
Credentials never reach logs, params or tags: use `redact` before showing a URI.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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

    uri = resolve_tracking_uri(config, workspace)
    mlflow.set_tracking_uri(uri)
    probe_server(uri)
    experiment = mlflow.get_experiment_by_name(config.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return mlflow.create_experiment(config.experiment)
