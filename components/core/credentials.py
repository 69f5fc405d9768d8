"""Credentials in URLs: which ones settings refuse, and how URLs are shown without them.

One rule for every URL a setting, manifest row or server holds: a user name or password
(`user:password@`) or a secret query parameter (signed S3/GCS/Azure URLs, API tokens) is a
credential. Settings refuse them (`credential_problem`, used by every params.yaml section); what
logs, reports, tags and messages show goes through `redact` (one URL) or `scrub_credentials` (free text).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit, urlunsplit

# Query parameters that carry a secret (signed S3/GCS/Azure URLs, API tokens): never in settings.
SECRET_QUERY_KEYS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "sig",
        "token",
        "access_token",
        "id_token",
        "auth",
        "authorization",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "access_key",
        "accesskey",
        "awsaccesskeyid",
        "secret_key",
        "api_key",
        "apikey",
        "key",
    }
)
CREDENTIAL_HELP = (
    "put credentials in the environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
    "AWS_PROFILE for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://, fsspec storage options "
    "through FSSPEC_<PROTOCOL>_<OPTION> variables), or in a DVC remote's config "
    "(`dvc remote modify --local`)"
)


def credential_problem(location: str) -> str | None:
    """Why a URL must not be stored (a user:password@ or a token in its query), or None."""
    if "://" not in location:
        return None
    parts = urlsplit(location)
    if "@" in parts.netloc:
        return "holds a user name or password (user:password@)"
    secrets = sorted({k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS})
    return f"holds a credential in its query ({', '.join(secrets)})" if secrets else None


def strings_in(value: Any) -> Iterator[str]:
    """Every string in a setting's value: itself, or inside its lists and mappings (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from strings_in(key)
            yield from strings_in(item)


def holds_credential(value: Any) -> bool:
    """Whether any URL in a setting's value (alone, or in its lists and mappings) holds a credential."""
    return any(credential_problem(text) for text in strings_in(value))


def _is_secret_pair(pair: str) -> bool:
    """Whether one raw `key=value` of a query names a secret (keys compared decoded, as parse_qsl reads them)."""
    return unquote_plus(pair.partition("=")[0]).lower() in SECRET_QUERY_KEYS


def redact(location: str) -> str:
    """A URL or URI as files, logs and messages may show it: no user name or password, no secret's value.

    `user:password@` becomes `***@` (it says credentials are in use, not which), a secret query
    parameter keeps its name with `***` as value; the rest (host, port, path, other parameters) is
    shown exactly as given. Paths and URLs without credentials come back unchanged.
    """
    if "://" not in location:
        return location
    parts = urlsplit(location)
    host = parts.netloc.rpartition("@")[2]
    pairs = parts.query.split("&") if parts.query else []
    if host == parts.netloc and not any(_is_secret_pair(pair) for pair in pairs):
        return location  # nothing to hide: shown exactly as given
    netloc = f"***@{host}" if host != parts.netloc else host
    query = "&".join(f"{pair.partition('=')[0]}=***" if _is_secret_pair(pair) else pair for pair in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_credentials(text: str) -> str:
    """Hide any `user:password@` inside URLs in free text (error messages, tag values)."""
    return re.sub(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s]+@", r"\1***@", str(text))
