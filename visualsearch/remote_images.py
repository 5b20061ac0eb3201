"""Fetch images named by http(s) URLs: time and size limits, per-host concurrency, SSRF checks.

Every hop of a fetch (the URL, then each redirect, at most :data:`MAX_REDIRECTS`) is
resolved once, each of its addresses checked (:func:`address_refusal`), and the
connection made to the checked address itself, with the URL's host name kept for the
``Host`` header and TLS (SNI and certificate checks): a DNS answer that changes between
the check and the connection (DNS rebinding) cannot move the request elsewhere.
Public addresses are fetched only on :attr:`FetchPolicy.ports`; refusals and failed
connections name no address and no reason that would map internal networks (the log
at INFO has them).
Environment proxies are never used. Bytes are read in chunks under a per-read timeout
and an overall deadline, and never past the byte limit.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar
from urllib.parse import quote, urljoin, urlsplit

from . import __version__
from .errors import ConfigurationError, ImageError, ImageTooLargeError, InvalidRequestError, UnsupportedImageError
from .images import is_image_data

if TYPE_CHECKING:
    from .settings import Settings

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
CHUNK_BYTES = 64 * 1024
USER_AGENT = f"visualsearch/{__version__} (catalogue image fetcher)"
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NOT_FOUND_STATUSES = frozenset({404, 410})

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# What VISUALSEARCH_ALLOW_PRIVATE_URLS=true allows: every network (the checks that
# never yield, below, still apply).
ALL_NETWORKS: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
# Instance metadata services hand out cloud credentials: refused even where private
# addresses are allowed (AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba, Oracle, the
# Azure WireServer).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                                  "100.100.100.200", "192.0.0.192",
                                                                  "168.63.129.16"))
# Refused even where private addresses are allowed, each with its phrase: link-local
# holds more credential services (ECS task credentials at 169.254.170.2, EKS pod
# identity...), and 192.0.0.0/24 is special-purpose (Python 3.11 calls parts of it global).
NEVER_NETWORKS: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("169.254.0.0/16"), "a link-local address"),
    (ipaddress.ip_network("fe80::/10"), "a link-local address"),
    (ipaddress.ip_network("192.0.0.0/24"), "a special-purpose address (192.0.0.0/24)"),
)
# Carrier-grade NAT: is_private says no, but it is no more public than 10/8.
CGNAT = ipaddress.ip_network("100.64.0.0/10")
# NAT64 (RFC 6052, RFC 8215): a gateway turns these into connections to the IPv4
# address written inside.
NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
DEFAULT_REMOTE_PORTS = (80, 443)


# --- errors ---------------------------------------------------------------------------


class RemoteImageError(ImageError):
    """An image URL could not be fetched."""

    code = "remote_error"


class RemoteUrlError(RemoteImageError, InvalidRequestError):
    """Not an http(s) URL with a host."""

    code = "remote_bad_url"


class RemoteRefusedError(RemoteImageError, InvalidRequestError):
    """The URL (or a redirect) leads to an address that may not be fetched (SSRF protection)."""

    code = "remote_refused"


class RemoteNotFoundError(RemoteImageError):
    """The server answered 404 or 410."""

    code = "remote_not_found"


class RemoteTooLargeError(RemoteImageError, ImageTooLargeError):
    """The body is larger than the byte limit."""

    code = "remote_too_large"


class RemoteNotImageError(RemoteImageError, UnsupportedImageError):
    """The server sent something that is neither labelled nor recognisable as an image."""

    code = "remote_not_image"


class RemoteUpstreamError(RemoteImageError):
    """The server failed: unreachable, a broken answer, an error status, too many redirects."""

    code = "remote_unreachable"


class RemoteHttpError(RemoteUpstreamError):
    """The server answered an error status other than 404/410 (403, 429, 5xx...)."""

    code = "remote_http_error"


class RemoteTimeoutError(RemoteUpstreamError):
    """Connecting, a read or the whole fetch took longer than allowed."""

    code = "remote_timeout"


# --- policy ---------------------------------------------------------------------------


def parse_allowed_networks(text: str | bool | Iterable[str] | None) -> tuple[IPNetwork, ...]:
    """The value of VISUALSEARCH_ALLOW_PRIVATE_URLS -> the non-public networks that may be fetched.

    ``true`` (yes, on, 1) allows every private address, ``false`` or empty none, and a
    comma-separated list of addresses or CIDR networks (``127.0.0.1,10.1.0.0/16``)
    exactly those. Metadata, multicast and unspecified addresses stay refused.

    Raises:
        ConfigurationError: neither a yes/no value nor a list of networks.
    """
    if text is None or text is False:
        return ()
    if text is True:
        return ALL_NETWORKS
    if isinstance(text, str):
        value = text.strip().lower()
        if value in ("1", "true", "yes", "on", "all"):
            return ALL_NETWORKS
        if value in ("0", "false", "no", "off", ""):
            return ()
        text = value.split(",")
    networks = []
    for item in text:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            raise ConfigurationError(
                f"not an address or network: {item!r} (use true, false, or e.g. 127.0.0.1,10.0.0.0/8)") from None
    return tuple(networks)


def parse_ports(text: str | Iterable[int | str]) -> tuple[int, ...]:
    """The value of VISUALSEARCH_REMOTE_PORTS (``"80,443"``) -> the ports public addresses may be fetched on.

    Raises:
        ConfigurationError: not a comma-separated list of port numbers (1-65535).
    """
    items = str(text).split(",") if isinstance(text, str) else list(text)
    ports = []
    for item in (str(item).strip() for item in items):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ConfigurationError(f"not a port number: {item!r} (use e.g. 80,443,8080)")
        ports.append(int(item))
    if not ports:
        raise ConfigurationError("at least one port is needed (default: 80,443)")
    return tuple(dict.fromkeys(ports))


@dataclass(frozen=True)
class FetchPolicy:
    """Limits and address rules of every fetch.

    Args:
        max_bytes: the largest body accepted.
        timeout: seconds for connecting and for each read.
        deadline: seconds for the whole fetch, redirects included.
        allowed_networks: non-public networks that may still be fetched (tests, private
            deployments), on any port; see :func:`parse_allowed_networks`.
        ports: the ports public addresses may be fetched on.
        concurrency: fetches at once (batch indexing).
        per_host: fetches at once to one host name.
    """

    max_bytes: int = 16 * 1024**2
    timeout: float = 5.0
    deadline: float = 15.0
    allowed_networks: tuple[IPNetwork, ...] = ()
    ports: tuple[int, ...] = DEFAULT_REMOTE_PORTS
    concurrency: int = 16
    per_host: int = 4

    @classmethod
    def from_settings(cls, settings: "Settings") -> "FetchPolicy":
        return cls(max_bytes=settings.max_upload_size, timeout=settings.remote_timeout,
                   deadline=settings.remote_deadline, allowed_networks=settings.allow_private_urls,
                   ports=settings.remote_ports, concurrency=settings.remote_concurrency,
                   per_host=settings.remote_per_host)


def _embedded_ipv4(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """The IPv4 address(es) a connection to ``address`` reaches: ::ffff:10.0.0.1,
    2002:0a00:0001:: (6to4) and 64:ff9b::a00:1 (NAT64) reach 10.0.0.1; none for others."""
    if not isinstance(address, ipaddress.IPv6Address):
        return ()
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is not None:
        return (embedded,)
    if address in NAT64_WELL_KNOWN or address in NAT64_LOCAL:
        return (ipaddress.IPv4Address(address.packed[12:16]),)
    return ()


def _nat64_other_readings(address: IPAddress) -> tuple[ipaddress.IPv4Address, ...]:
    """In the local-use prefix 64:ff9b:1::/48 the gateway may use a /48, /56 or /64
    prefix, which puts the IPv4 address elsewhere (RFC 6052 2.2): those readings too."""
    if not isinstance(address, ipaddress.IPv6Address) or address not in NAT64_LOCAL:
        return ()
    b = address.packed
    if b[8] != 0:  # bits 64-71 are zero in those formats
        return ()
    return tuple(ipaddress.IPv4Address(v) for v in (b[6:8] + b[9:11], b[7:8] + b[9:12], b[9:13]))


def _never_refusal(address: IPAddress) -> str | None:
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for network, reason in NEVER_NETWORKS:
        if address in network:
            return reason
    return None


def is_public(address: IPAddress) -> bool:
    """Globally reachable (after unwrapping IPv4 written inside IPv6): what is fetched by default."""
    embedded = _embedded_ipv4(address)
    if embedded:
        return all(is_public(inner) for inner in embedded)
    return (address.is_global and address not in CGNAT and not address.is_private and not address.is_reserved
            and not address.is_multicast and _never_refusal(address) is None)


def address_refusal(address: IPAddress, allowed: Iterable[IPNetwork] = ()) -> str | None:
    """Why ``address`` may not be fetched (a phrase for the log), or None when it may."""
    for reading in _nat64_other_readings(address):
        reason = _never_refusal(reading)
        if reason is not None:
            return reason
    embedded = _embedded_ipv4(address)
    if embedded:  # checked as the IPv4 address it reaches, allowed networks included
        return next((r for r in (address_refusal(inner, allowed) for inner in embedded) if r), None)
    reason = _never_refusal(address)
    if reason is not None:
        return reason
    if address.is_multicast or address.is_unspecified:  # 0.0.0.0 and :: reach this host
        return "a multicast or unspecified address"
    if is_public(address) or any(address in network for network in allowed):
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_reserved:
        return "a reserved address"
    return "a private address"


# --- the search API's share -----------------------------------------------------------

_API_SLOTS: dict[int, threading.BoundedSemaphore] = {}
_API_SLOTS_LOCK = threading.Lock()


def api_fetch_slots(limit: int) -> threading.BoundedSemaphore:
    """The process-wide slots of API image-URL fetches (VISUALSEARCH_REMOTE_API_CONCURRENCY):
    take one with ``acquire(blocking=False)`` and answer "busy" when none is free."""
    limit = max(1, int(limit))
    with _API_SLOTS_LOCK:
        slots = _API_SLOTS.get(limit)
        if slots is None:
            slots = _API_SLOTS[limit] = threading.BoundedSemaphore(limit)
        return slots


# --- one fetch ------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchedImage:
    """The answer to a fetch: the body, or ``not_modified`` after a conditional request.

    ``etag`` and ``last_modified_ns`` are the validators to send next time.
    """

    url: str
    data: bytes = b""
    not_modified: bool = False
    content_type: str | None = None
    etag: str | None = None
    last_modified_ns: int | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def fetch_image(url: str, policy: FetchPolicy = FetchPolicy(), *, etag: str | None = None,
                last_modified_ns: int | None = None) -> FetchedImage:
    """Download the image at ``url``, following redirects, within the policy's limits.

    Args:
        url: an http(s) URL.
        policy: limits and allowed networks.
        etag, last_modified_ns: validators of a stored copy; sent as If-None-Match and
            If-Modified-Since, so that an unchanged image answers ``not_modified``.

    Returns:
        The body (labelled ``image/*`` or recognisable as an image format), or
        ``not_modified``.

    Raises:
        RemoteUrlError, RemoteRefusedError, RemoteNotFoundError, RemoteTooLargeError,
        RemoteNotImageError, RemoteTimeoutError, RemoteHttpError, RemoteUpstreamError:
        see each class; every message names the URL and says what to do.
    """
    deadline = time.monotonic() + policy.deadline
    headers = {"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified_ns is not None:
        headers["If-Modified-Since"] = email.utils.formatdate(last_modified_ns / 1e9, usegmt=True)
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        target = _check_url(current, original=url, policy=policy)
        try:
            result = _request(target, headers, policy, deadline)
        except socket.timeout:
            raise RemoteTimeoutError(
                f"{url}: no answer within the time limit ({policy.timeout:g} s per read, {policy.deadline:g} s "
                "in all); check that the server is up, or raise VISUALSEARCH_REMOTE_TIMEOUT or _DEADLINE") from None
        except _ConnectFailed as exc:
            # Refused, unreachable or too slow to accept alike, the detail only in the log:
            # the API must not tell which ports of which addresses answer.
            logger.info("%s: cannot connect to %s port %s: %s", url, target.host, target.port, exc.detail)
            raise RemoteUpstreamError(f"{url}: cannot connect to {target.host} (port {target.port}); check the URL "
                                      "and that the server is reachable") from None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise RemoteUpstreamError(f"{url}: cannot fetch from {target.host}: {_describe(exc)}; check the URL "
                                      "and that the server is reachable") from None
        if isinstance(result, str):
            current = result
            continue
        if result.not_modified and not (etag or last_modified_ns is not None):
            raise RemoteHttpError(f"{url}: the server answered 304 Not Modified to a plain request")
        return result
    raise RemoteUpstreamError(f"{url}: more than {MAX_REDIRECTS} redirects; use the image's final URL")


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


def _check_url(url: str, *, original: str, policy: FetchPolicy) -> _Target:
    where = url if url == original else f"{original} (redirected to {url})"
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise RemoteUrlError(f"{where}: a URL may not contain spaces or control characters; encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RemoteUrlError(f"{where}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES or not parts.hostname:
        raise RemoteUrlError(f"{where}: only http:// and https:// URLs with a host name can be fetched")
    if parts.username or parts.password:
        raise RemoteUrlError(f"{where}: URLs with credentials (user:password@) are not fetched")
    try:  # an international name goes on the wire (DNS, Host, SNI) in its IDNA form
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise RemoteUrlError(f"{where}: {parts.hostname!r} is not a valid host name") from None
    port = port or DEFAULT_PORTS[scheme]
    try:
        answers = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise RemoteUpstreamError(f"{where}: cannot resolve host {host!r} ({_describe(exc)}); check the URL") from None
    addresses = tuple(dict.fromkeys(str(answer[4][0]).split("%")[0] for answer in answers))
    # Every address must pass: a name that also resolves to a private one is refused.
    # The message never says which address or why: that would map internal networks.
    for text in addresses:
        address = ipaddress.ip_address(text)
        reason = address_refusal(address, policy.allowed_networks)
        if reason is not None:
            logger.info("refused %s: %s resolves to %s, %s", where, host, text, reason)
            raise RemoteRefusedError(
                f"{where}: {host} resolves to a non-public address; only public addresses are fetched "
                "(VISUALSEARCH_ALLOW_PRIVATE_URLS lets a private deployment fetch from its own networks)")
        # Public addresses only on the listed ports; non-public ones the deployment
        # allowed (its own services) on any.
        if port not in policy.ports and is_public(address):
            raise RemoteRefusedError(
                f"{where}: port {port} is not fetched; image URLs may use port "
                f"{', '.join(map(str, policy.ports))} (VISUALSEARCH_REMOTE_PORTS)")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    path = _NON_ASCII.sub(lambda match: quote(match.group()), path)  # café.jpg -> caf%C3%A9.jpg
    return _Target(url, scheme, host, port, path, addresses)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already checked address; ``host`` stays the URL's for the Host header."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address
        self.raw_socket: socket.socket | None = None
        self.expired = False

    def connect(self) -> None:
        self.sock = self.raw_socket = socket.create_connection((self.address, self.port), self.timeout)

    def close(self) -> None:
        """Nothing yet: http.client closes the connection as soon as a response that ends
        it arrives, and the body is still to be read under timeouts set on the socket."""

    def expire(self) -> None:
        """Cut the connection short (from another thread): the deadline passed."""
        self.expired = True
        if self.raw_socket is not None:
            with contextlib.suppress(OSError):
                self.raw_socket.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        """Close the connection and its socket."""
        super().close()
        if self.raw_socket is not None:
            self.raw_socket.close()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def __init__(self, host: str, port: int, *, address: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, address=address, timeout=timeout)
        self.tls = context

    def connect(self) -> None:
        plain = socket.create_connection((self.address, self.port), self.timeout)
        try:
            # SNI and the certificate check use the URL's host name, not the address.
            self.sock = self.raw_socket = self.tls.wrap_socket(plain, server_hostname=self.host)
        except BaseException:
            plain.close()
            raise


_TLS = ssl.create_default_context()


def _request(target: _Target, headers: dict[str, str], policy: FetchPolicy,
             deadline: float) -> FetchedImage | str:
    """One hop: the image, or the URL a redirect points to."""
    connection = _connect(target, policy, deadline)
    # A hard stop at the deadline: per-read timeouts alone would let a server that
    # trickles its headers byte by byte hold the fetch far longer.
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), connection.expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        return _exchange(connection, target, headers, policy, deadline)
    except (OSError, http.client.HTTPException, ValueError):
        if connection.expired:
            raise socket.timeout("deadline passed") from None
        raise
    finally:
        watchdog.cancel()
        connection.finish()


def _exchange(connection: "_PinnedHTTPConnection", target: _Target, headers: dict[str, str], policy: FetchPolicy,
              deadline: float) -> FetchedImage | str:
    response: http.client.HTTPResponse | None = None
    try:
        connection.request("GET", target.path, headers=headers)
        response = connection.getresponse()
        status = response.status
        if status in REDIRECT_STATUSES:
            location = response.getheader("Location")
            if not location:
                raise RemoteHttpError(f"{target.url}: redirect {status} without a Location")
            return urljoin(target.url, location.strip())
        if status == 304:
            return FetchedImage(target.url, not_modified=True, etag=_etag(response),
                                last_modified_ns=_http_date_ns(response.getheader("Last-Modified")))
        if status in NOT_FOUND_STATUSES:
            raise RemoteNotFoundError(f"{target.url}: the server answered {status} {response.reason}; "
                                      "check the image URL (the image may have been removed)")
        if status not in (200, 203):
            raise RemoteHttpError(f"{target.url}: the server answered {status} {response.reason}; "
                                  "check the URL, or try again later if the server is busy")
        data = _read_body(response, connection, target, policy, deadline)
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower() or None
        if not (content_type or "").startswith("image/") and not is_image_data(data):
            raise RemoteNotImageError(
                f"{target.url}: the server sent {content_type or 'an unlabelled body'}, not an image; "
                "use the URL of the image file itself, not of a page showing it")
        return FetchedImage(target.url, data=data, content_type=content_type, etag=_etag(response),
                            last_modified_ns=_http_date_ns(response.getheader("Last-Modified")))
    finally:
        if response is not None:
            response.close()


class _ConnectFailed(Exception):
    """No address of a hop accepted the connection (refused, unreachable, timed out)."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _connect(target: _Target, policy: FetchPolicy, deadline: float) -> _PinnedHTTPConnection:
    details: list[str] = []
    for address in target.addresses:
        timeout = _remaining(policy.timeout, deadline)
        if target.scheme == "https":
            connection: _PinnedHTTPConnection = _PinnedHTTPSConnection(
                target.host, target.port, address=address, timeout=timeout, context=_TLS)
        else:
            connection = _PinnedHTTPConnection(target.host, target.port, address=address, timeout=timeout)
        try:
            connection.connect()
            return connection
        except ssl.SSLError:
            connection.finish()
            raise  # a certificate problem is not fixed by the next address
        except OSError as exc:
            connection.finish()
            details.append(f"{address}: {_describe(exc)}")
    raise _ConnectFailed("; ".join(details) or "no address to connect to")


def _read_body(response: http.client.HTTPResponse, connection: _PinnedHTTPConnection, target: _Target,
               policy: FetchPolicy, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > policy.max_bytes:
        raise _too_large(target, policy, f"{int(declared):,} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        if connection.raw_socket is not None:
            connection.raw_socket.settimeout(_remaining(policy.timeout, deadline))
        # At most one byte past the limit: enough to know it is too large. read1: one
        # receive, so that a body trickling in byte by byte still meets the deadline.
        chunk = response.read1(min(CHUNK_BYTES, policy.max_bytes + 1 - size))
        if not chunk:
            if connection.expired:
                raise socket.timeout("deadline passed")
            if declared is not None and declared.strip().isdigit() and size < int(declared):
                raise http.client.IncompleteRead(b"", int(declared) - size)  # read1 does not check
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > policy.max_bytes:
            raise _too_large(target, policy, "more")


def _too_large(target: _Target, policy: FetchPolicy, size: str) -> RemoteTooLargeError:
    return RemoteTooLargeError(f"{target.url}: the image is {size} bytes; the limit is {policy.max_bytes:,} "
                               "(VISUALSEARCH_MAX_UPLOAD_SIZE): use a smaller rendition of the image")


def _remaining(timeout: float, deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("deadline passed")
    return min(timeout, left)


def _etag(response: http.client.HTTPResponse) -> str | None:
    """The response's ETag; None for one holding a NUL, which no catalogue column can store."""
    etag = response.getheader("ETag")
    return None if etag is None or "\x00" in etag else etag


def _http_date_ns(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(email.utils.parsedate_to_datetime(text).timestamp()) * 1_000_000_000
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _describe(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# --- many fetches ---------------------------------------------------------------------

T = TypeVar("T")
R = TypeVar("R")


class RemoteFetcher:
    """Runs fetches on a thread pool, at most ``policy.per_host`` at once to one host.

    Use as a context manager; :meth:`map` keeps the results in order.
    """

    def __init__(self, policy: FetchPolicy):
        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=max(1, policy.concurrency), thread_name_prefix="fetch")
        self._hosts: dict[str, threading.BoundedSemaphore] = {}
        self._hosts_lock = threading.Lock()

    def __enter__(self) -> "RemoteFetcher":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def fetch(self, url: str, *, etag: str | None = None, last_modified_ns: int | None = None) -> FetchedImage:
        """:func:`fetch_image` under this fetcher's per-host limit."""
        with self._host_slot(url):
            return fetch_image(url, self.policy, etag=etag, last_modified_ns=last_modified_ns)

    def map(self, work: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        """``work(item)`` for each item on the pool, yielded in order, with a bounded
        number (twice the concurrency) started ahead of the consumer."""
        ahead = 2 * max(1, self.policy.concurrency)
        futures: deque[Future[R]] = deque()
        try:
            for item in items:
                futures.append(self._pool.submit(work, item))
                if len(futures) >= ahead:
                    yield futures.popleft().result()
            while futures:
                yield futures.popleft().result()
        finally:
            for future in futures:
                future.cancel()

    def _host_slot(self, url: str) -> threading.BoundedSemaphore:
        try:
            host = (urlsplit(url).hostname or "").lower()
        except ValueError:
            host = ""
        with self._hosts_lock:
            slot = self._hosts.get(host)
            if slot is None:
                slot = self._hosts[host] = threading.BoundedSemaphore(max(1, self.policy.per_host))
            return slot

