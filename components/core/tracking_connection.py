"""Reaching MLflow: which tracking URI, credentials kept out of it, a quick probe, retries of transient failures.

The tracking URI comes from params (`tracking.uri`), unless MLFLOW_TRACKING_URI is set in the
environment: servers and their credentials are deployment settings, not project settings.
Credentials never reach logs, params or tags: messages show `shown_uri()` (credentials.redact).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from components.core.config import TrackingConfig
from components.core.credentials import redact, scrub_credentials
from components.core.errors import Unavailable
from components.core.settings import environment, workspace_root

T = TypeVar("T")


def resolve_tracking_uri(config: TrackingConfig, workspace: str | Path | None = None) -> str:
    """The URI to use; a relative SQLite path is anchored at the main workspace (settings.workspace_root)."""
    uri = environment().tracking_uri or config.uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        base = Path(workspace) if workspace else workspace_root()
        uri = prefix + str((base / uri[len(prefix) :]).resolve())
    return uri


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
    return (Path(uri[len("sqlite:///") :]).parent / "mlruns").resolve().as_uri()


# --- retries ------------------------------------------------------------------------------------

# MlflowException codes worth another try: the server or the database was busy or unreachable.
TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
    "ABORTED",
}


class TrackingUnavailable(Unavailable):
    """MLflow stayed unreachable (or kept failing) after every retry."""


MAX_RETRY_WAIT_S = 30.0  # backoff doubles from tracking.retry_backoff_s up to this


@dataclass(frozen=True)
class RetryPolicy:
    """How MLflow calls are retried: built from the tracking settings (`from_config`), no defaults of its own."""

    attempts: int
    first_wait_s: float
    max_wait_s: float = MAX_RETRY_WAIT_S

    @classmethod
    def from_config(cls, config: TrackingConfig) -> RetryPolicy:
        return cls(attempts=config.retry_attempts, first_wait_s=config.retry_backoff_s)

    @classmethod
    def default(cls) -> RetryPolicy:
        """The policy of params.yaml's defaults, for callers handed no settings."""
        return cls.from_config(TrackingConfig())


def is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in TRANSIENT_CODES
    missing = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    return isinstance(exc, OSError) and not isinstance(exc, missing)  # requests' errors are OSErrors


def with_retries(
    what: str, fn: Callable[..., T], *args: Any, policy: RetryPolicy = RetryPolicy.default(), **kwargs: Any
) -> T:
    """Call an MLflow function, retrying transient failures with exponential backoff.

    Raises TrackingUnavailable naming the (redacted) server once the attempts are used up.
    """
    retrying = Retrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s),
        retry=retry_if_exception(is_transient),
        reraise=True,
    )
    try:
        return retrying(fn, *args, **kwargs)
    except Exception as exc:
        if not is_transient(exc):
            raise
        server = shown_uri()
        detail = scrub_credentials(getattr(exc, "message", None) or exc)
        raise TrackingUnavailable(
            f"MLflow at {server} failed to {what} after {policy.attempts} attempts: {detail}"
        ) from None
