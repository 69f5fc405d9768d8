"""Fetching a URL under components/ingestion/urls.py's policy: checked connections, redirects, one deadline.

  - every connection goes only to an address `urls.vetted_addresses` passed, checked when the
    connection is made (redirects included), and never through a proxy;
  - at most `ingest.max_redirects` redirects, each one's scheme checked again;
  - `ingest.download_timeout_s` is a deadline for the whole request (connect, redirects, headers and
    body together), not for each socket read: a server dripping a byte a second cannot hold a worker;
  - a body shorter than its Content-Length is an error, never a file: the caller gets OSError.
Buckets (s3://, gs://) and fsspec's `memory://` are read through fsspec, after the same scheme check.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from components.ingestion.urls import UrlPolicy, URLRefused, check_scheme, vetted_addresses

HTTP_SCHEMES = ("http", "https")
CHUNK_READ = 1 << 20  # the most one read of a response body asks the socket for


class Deadline:
    """One request's whole time budget: connect, redirects, headers and body together.

    A socket timeout bounds each read, not the request: a server that drips a byte a second never
    trips it. At the deadline a timer shuts the request's sockets down, which ends any read blocked
    on them; whatever was read by then is refused with TimeoutError.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds, self.expired = seconds, False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                self._shut(sock)

    def check(self) -> None:
        if self.expired:
            raise TimeoutError(f"no complete answer within ingest.download_timeout_s={self.seconds:g} s")

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: wakes a read blocked in TLS too
        except OSError:
            pass  # already closed


class CheckedBody:
    """An HTTP response whose reads obey its request's deadline and whose body must be complete.

    read(n) returns n bytes, or fewer only at the end of the body; an end before the declared
    Content-Length raises OSError, so a truncated download is never saved or reused.
    """

    def __init__(self, response: http.client.HTTPResponse, deadline: Deadline) -> None:
        self._response, self._deadline = response, deadline
        self.headers, self.status = response.headers, response.status
        self._expected: int | None = response.length  # None: no Content-Length (chunked, or until close)
        self._received = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = n if n >= 0 else None
        while wanted is None or wanted > 0:
            chunk = self._read1(min(wanted or CHUNK_READ, CHUNK_READ))
            if not chunk:
                self._check_complete()
                break
            parts.append(chunk)
            if wanted is not None:
                wanted -= len(chunk)
        return b"".join(parts)

    def _read1(self, n: int) -> bytes:
        self._deadline.check()
        try:
            chunk = self._response.read1(n)
        except (OSError, http.client.HTTPException) as exc:
            self._deadline.check()  # a read ended by the deadline says so
            raise OSError(f"the connection failed while reading: {exc or type(exc).__name__}") from None
        self._deadline.check()  # a read cut short by the deadline is no body
        self._received += len(chunk)
        return chunk

    def _check_complete(self) -> None:
        if self._expected is not None and self._received < self._expected:
            raise OSError(f"the body ended after {self._received:,} of its {self._expected:,} bytes (Content-Length)")

    def close(self) -> None:
        self._deadline.cancel()
        self._response.close()

    def __enter__(self) -> CheckedBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _CheckedConnection:
    """Mixin: connect only to vetted addresses of the host (checked at connect, so redirects are too)."""

    policy: UrlPolicy
    deadline: Deadline

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._create_connection = self._connect_vetted

    def _connect_vetted(
        self, address: tuple[str, int], timeout: Any = None, source_address: Any = None
    ) -> socket.socket:
        host, port = address
        last: OSError | None = None
        for family, socktype, proto, _, sockaddr in vetted_addresses(host, port, self.policy.allow_private_hosts):
            sock = socket.socket(family, socktype, proto)
            self.deadline.watch(sock)
            try:
                sock.settimeout(self.policy.timeout_s)
                sock.connect(sockaddr)  # the checked address, not a fresh lookup
                return sock
            except OSError as exc:
                sock.close()
                last = exc
        raise last or OSError(f"cannot connect to {host}:{port}")


class _CheckedHTTP(_CheckedConnection, http.client.HTTPConnection):
    pass


class _CheckedHTTPS(_CheckedConnection, http.client.HTTPSConnection):
    pass


class _Redirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        hops = getattr(req, "hops", 0) + 1
        if hops > self.policy.max_redirects:
            raise URLRefused(f"more than ingest.max_redirects={self.policy.max_redirects} redirects")
        check_scheme(newurl, self.policy)  # e.g. https -> http, or -> file://; the host is checked at connect
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.hops = hops
        return new


def _opener(policy: UrlPolicy, deadline: Deadline) -> urllib.request.OpenerDirector:
    http_class = type("CheckedHTTP", (_CheckedHTTP,), {"policy": policy, "deadline": deadline})
    https_class = type("CheckedHTTPS", (_CheckedHTTPS,), {"policy": policy, "deadline": deadline})

    class Plain(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(http_class, req)

    class Secure(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(https_class, req, context=self._context)

    # No ProxyHandler: a proxy would make us check the proxy's address instead of the target's.
    opener = urllib.request.OpenerDirector()
    for handler in (
        Plain(),
        Secure(),
        _Redirects(policy),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    return opener


def http_open(url: str, policy: UrlPolicy, method: str = "GET") -> CheckedBody:
    """An HTTP(S) response for url under the policy, within one deadline of policy.timeout_s for the
    whole request; URLRefused, or OSError for network/HTTP failures, a timeout or a truncated body."""
    check_scheme(url, policy)
    request = urllib.request.Request(url, method=method, headers={"User-Agent": "transfer-pipeline-ingest"})
    deadline = Deadline(policy.timeout_s)
    try:
        return CheckedBody(_answer(request, policy, deadline), deadline)
    except BaseException:
        deadline.cancel()
        raise


def _answer(request: urllib.request.Request, policy: UrlPolicy, deadline: Deadline) -> Any:
    """The response to request (headers read); failures as URLRefused, TimeoutError or OSError."""
    try:
        return _opener(policy, deadline).open(request, timeout=policy.timeout_s)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise OSError(f"HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, URLRefused):
            raise exc.reason from None
        deadline.check()
        raise OSError(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:  # headers cut short, by the deadline or the server
        deadline.check()
        raise OSError(f"no valid HTTP answer: {exc or type(exc).__name__}") from None


def remote_version(info: dict[str, Any]) -> str:
    """What the server says identifies this content (ETag, generation, modification time); '' = unknown."""
    for key in (
        "ETag",
        "etag",
        "md5Hash",
        "generation",
        "LastModified",
        "Last-Modified",
        "last_modified",
        "mtime",
        "updated",
        "created",
    ):
        if info.get(key):
            return f"{key}={info[key]}"
    return ""


def remote_info(url: str, policy: UrlPolicy) -> dict[str, Any] | None:
    """{'size', 'version'} of a remote file, or None when it does not exist (OSError when unreachable)."""
    check_scheme(url, policy)
    if urlsplit(url).scheme.lower() in HTTP_SCHEMES:
        try:
            with http_open(url, policy, method="HEAD") as response:
                headers = {k: v for k, v in response.headers.items()}
        except OSError as exc:
            if str(exc).startswith("HTTP 404"):
                return None
            if str(exc).startswith(("HTTP 405", "HTTP 501")):  # no HEAD here: size and version unknown, GET decides
                return {"size": 0, "version": ""}
            raise
        return {"size": int(headers.get("Content-Length") or 0), "version": remote_version(headers)}
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return {"size": int(info.get("size") or 0), "version": remote_version(info)}


def open_remote(url: str, policy: UrlPolicy) -> BinaryIO:
    """A readable binary stream of a remote file (close it, or use it in `with`)."""
    check_scheme(url, policy)
    if urlsplit(url).scheme.lower() in HTTP_SCHEMES:
        return http_open(url, policy)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.open(path, "rb")
