"""Which URLs ingest may reach: schemes, hosts, and no credentials (`credentials.redact` shows one).

The URL in `ingest.source` comes from the trusted params author, but the URLs inside a manifest
and the redirects a server answers with do not, so every request is checked the same way
(components/ingestion/url_fetch.py makes the requests, and checks each hop here):
  - schemes: https, s3 and gs (and fsspec's in-process `memory://`); plain http only with
    `ingest.allow_http`;
  - hosts: every address a name resolves to must be public (no loopback, private, link-local,
    multicast or reserved address) unless `ingest.allow_private_hosts`; the check runs when the
    connection is made, on the address actually used, so a redirect or a DNS change cannot slip
    past it;
  - credentials (`user:password@`, signed-URL or token query parameters) are refused: they belong
    in the environment, never in settings, manifests or reports.
The credential check itself lives in components/core/credentials.py, so a params file with a secret in
`ingest.source` is refused when it is loaded, before any stage writes anything.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from components.core.credentials import credential_problem

SAFE_SCHEMES = ("https", "s3", "gs", "gcs")
# fsspec's in-process store: it reaches nothing outside this process (tests and notebooks use it).
IN_PROCESS_SCHEMES = ("memory",)


class URLRefused(ValueError):
    """A URL the policy does not allow (scheme, host, credentials, too many redirects)."""


@dataclass(frozen=True)
class UrlPolicy:
    """What a URL may be and how it is fetched: built from the ingest settings (`from_config`) only."""

    allow_http: bool
    allow_private_hosts: bool
    timeout_s: float
    max_redirects: int

    @classmethod
    def from_config(cls, config: Any) -> UrlPolicy:
        """From an IngestConfig."""
        return cls(config.allow_http, config.allow_private_hosts, config.download_timeout_s, config.max_redirects)


def is_remote(location: str) -> bool:
    scheme = location.split("://", 1)[0] if "://" in location else ""
    return bool(scheme) and scheme.lower() != "file"


def check_scheme(url: str, policy: UrlPolicy) -> str:
    """The URL's scheme if the policy allows it; URLRefused otherwise."""
    scheme = urlsplit(url).scheme.lower()
    allowed = SAFE_SCHEMES + IN_PROCESS_SCHEMES + (("http",) if policy.allow_http else ())
    if scheme not in allowed:
        hint = " (set ingest.allow_http: true to allow plain http)" if scheme == "http" else ""
        raise URLRefused(
            f"scheme {scheme or '(none)'}:// is not allowed{hint}; allowed: "
            f"{', '.join(s for s in allowed if s not in IN_PROCESS_SCHEMES)}"
        )
    problem = credential_problem(url)
    if problem:
        raise URLRefused(f"the URL {problem}")
    return scheme


def address_problem(address: str) -> str | None:
    """Why a resolved address is not a public one, or None."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    for what in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):  # most specific first
        if getattr(ip, f"is_{what}"):
            return f"{what.replace('_', '-')} address"
    return None if ip.is_global else "non-public address"


def vetted_addresses(host: str, port: int, allow_private_hosts: bool) -> list[tuple[Any, ...]]:
    """getaddrinfo results for host, refusing the host if ANY address is not public (unless allowed)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise URLRefused(f"host {host} does not resolve ({exc.strerror})") from None
    if not allow_private_hosts:
        for *_, sockaddr in found:
            problem = address_problem(sockaddr[0])
            if problem:
                raise URLRefused(
                    f"host {host} resolves to a {problem} ({sockaddr[0]}); "
                    "set ingest.allow_private_hosts: true for a trusted lab server"
                )
    return found
