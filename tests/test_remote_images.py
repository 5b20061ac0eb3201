"""Images at URLs: a real HTTP server on 127.0.0.1 serves real images, slow answers,
floods and redirects; the fetcher, the indexer and the search API are checked against it."""

from __future__ import annotations

import email.utils
import io
import ipaddress
import json
import logging
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import create_engine, inspect, text

from visualsearch import indexing, remote_images, url_recheck
from visualsearch.errors import ConfigurationError
from visualsearch.remote_images import (
    ALL_NETWORKS,
    FetchPolicy,
    RemoteFetcher,
    RemoteHttpError,
    RemoteNotFoundError,
    RemoteNotImageError,
    RemoteRefusedError,
    RemoteTimeoutError,
    RemoteTooLargeError,
    RemoteUpstreamError,
    RemoteUrlError,
    address_refusal,
    fetch_image,
    parse_allowed_networks,
    parse_ports,
)
from visualsearch.service import VisualSearch
from visualsearch.settings import Settings
from web import create_app

from .conftest import make_image, write_catalogue

LOOPBACK = parse_allowed_networks("127.0.0.1")
POLICY = FetchPolicy(max_bytes=1 << 20, timeout=2.0, deadline=5.0, allowed_networks=LOOPBACK)


def png(seed: int) -> bytes:
    """The PNG bytes of conftest's picture number ``seed``."""
    with tempfile.TemporaryDirectory() as folder:
        return make_image(Path(folder) / "p.png", seed).read_bytes()


# --- the test server -------------------------------------------------------------------


class ImageServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 whose routes are plain functions of the handler."""

    def __init__(self):
        self.routes: dict[str, Callable[[BaseHTTPRequestHandler], None]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.statuses: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                with server.lock:
                    server.requests.append((self.path, dict(self.headers)))
                route = server.routes.get(self.path.split("?")[0])
                if route is None:
                    self.send_error(404)
                    return
                route(self)

            def send_response(self, code, message=None):
                with server.lock:
                    server.statuses.append((self.path, code))
                super().send_response(code, message)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that hang up early (the size limit) are expected

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def count(self, path: str, status: int | None = None) -> int:
        with self.lock:
            if status is None:
                return sum(1 for p, _ in self.requests if p == path)
            return sum(1 for p, s in self.statuses if p == path and s == status)

    def image(self, path: str, data: bytes, *, etag: str | None = None, last_modified: float | None = None,
              content_type: str = "image/png") -> None:
        """Serve ``data`` at ``path``, answering 304 to matching conditional requests."""
        stamp = email.utils.formatdate(last_modified, usegmt=True) if last_modified is not None else None

        def route(handler):
            unchanged = (etag is not None and handler.headers.get("If-None-Match") == etag) or (
                stamp is not None and handler.headers.get("If-Modified-Since") is not None
                and email.utils.parsedate_to_datetime(handler.headers["If-Modified-Since"])
                >= email.utils.parsedate_to_datetime(stamp))
            handler.send_response(304 if unchanged else 200)
            if etag:
                handler.send_header("ETag", etag)
            if stamp:
                handler.send_header("Last-Modified", stamp)
            if unchanged:
                handler.end_headers()
                return
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)

        self.routes[path] = route

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def route(handler):
            handler.send_response(status)
            handler.send_header("Location", location)
            handler.end_headers()

        self.routes[path] = route

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with ImageServer() as running:
        yield running


def flood(handler, *, declared: int | None, total: int):
    """A body of ``total`` bytes, announcing ``declared`` (None: none, read until close)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "image/png")
    if declared is not None:
        handler.send_header("Content-Length", str(declared))
    handler.end_headers()
    chunk = b"\x89PNG" + b"x" * 65532
    for _ in range(total // len(chunk)):
        handler.wfile.write(chunk)


def fake_dns(monkeypatch, names: dict[str, str]) -> list[str]:
    """Resolve ``names`` to the given addresses (every other name as usual); returns the
    list of names looked up."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def getaddrinfo(host, port, *args, **kwargs):
        asked.append(host)
        if host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


# --- fetching --------------------------------------------------------------------------


def test_fetch_an_image_with_its_validators(server):
    data = png(1)
    server.image("/a.png", data, etag='"v1"', last_modified=1_700_000_000)
    fetched = fetch_image(server.url("/a.png"), POLICY)
    assert fetched.data == data and fetched.content_type == "image/png" and not fetched.not_modified
    assert fetched.etag == '"v1"' and fetched.last_modified_ns == 1_700_000_000 * 10**9
    again = fetch_image(server.url("/a.png"), POLICY, etag='"v1"')
    assert again.not_modified and again.data == b""
    by_date = fetch_image(server.url("/a.png"), POLICY, last_modified_ns=fetched.last_modified_ns)
    assert by_date.not_modified
    headers = server.requests[-1][1]
    assert headers["If-Modified-Since"] == email.utils.formatdate(1_700_000_000, usegmt=True)
    assert headers["Host"] == f"127.0.0.1:{server.port}"


def test_international_urls_are_encoded(server):
    server.image("/caf%C3%A9.png", png(6))
    assert fetch_image(server.url("/café.png"), POLICY).data == png(6)
    assert server.requests[-1][0] == "/caf%C3%A9.png"


def test_missing_image_is_remote_not_found(server):
    with pytest.raises(RemoteNotFoundError, match="404") as caught:
        fetch_image(server.url("/nothing.png"), POLICY)
    assert caught.value.code == "remote_not_found"


def test_server_errors_and_pages_are_typed(server):
    server.routes["/broken"] = lambda h: h.send_error(503)
    with pytest.raises(RemoteHttpError, match="503"):
        fetch_image(server.url("/broken"), POLICY)
    server.image("/page", b"<html>a shop page</html>", content_type="text/html")
    with pytest.raises(RemoteNotImageError, match="text/html, not an image"):
        fetch_image(server.url("/page"), POLICY)
    # Mislabelled bytes that decode are fine: the bytes decide.
    server.image("/octets", png(2), content_type="application/octet-stream")
    assert fetch_image(server.url("/octets"), POLICY).data == png(2)


def test_slow_server_times_out(server):
    def slow(handler):
        time.sleep(3)
        handler.send_error(500)

    server.routes["/slow"] = slow
    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError, match="time limit") as caught:
        fetch_image(server.url("/slow"), replace(POLICY, timeout=0.3))
    assert caught.value.code == "remote_timeout" and time.monotonic() - started < 2


def test_a_trickling_body_stops_at_the_deadline(server):
    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        for _ in range(1000):  # each byte well within the per-read timeout
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.05)

    server.routes["/trickle"] = trickle
    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError):
        fetch_image(server.url("/trickle"), replace(POLICY, timeout=1.0, deadline=0.6))
    assert time.monotonic() - started < 2


def test_trickling_headers_stop_at_the_deadline(server):
    def trickle(handler):
        handler.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for number in range(90):
            handler.wfile.write(f"X-Header-{number}: x\r\n".encode())
            handler.wfile.flush()
            time.sleep(0.05)

    server.routes["/headers"] = trickle
    started = time.monotonic()
    with pytest.raises(RemoteTimeoutError):
        fetch_image(server.url("/headers"), replace(POLICY, timeout=1.0, deadline=0.6))
    assert time.monotonic() - started < 2


def test_streamed_body_past_the_limit_is_too_large(server):
    server.routes["/endless"] = lambda h: flood(h, declared=None, total=4 << 20)
    with pytest.raises(RemoteTooLargeError, match="limit is 1,048,576") as caught:
        fetch_image(server.url("/endless"), POLICY)
    assert caught.value.code == "remote_too_large"


def test_a_body_cut_short_is_an_error_not_an_image(server):
    def cut(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(png(1)[:100])

    server.routes["/cut"] = cut
    with pytest.raises(RemoteUpstreamError, match="900 more expected"):
        fetch_image(server.url("/cut"), POLICY)


def test_declared_size_past_the_limit_is_refused_before_reading(server):
    server.routes["/declared"] = lambda h: flood(h, declared=4 << 20, total=4 << 20)
    with pytest.raises(RemoteTooLargeError, match="4,194,304 bytes"):
        fetch_image(server.url("/declared"), POLICY)


def test_a_lying_content_length_reads_no_more_than_declared(server):
    # Claims 100 bytes and sends megabytes: the client reads what was declared, no more.
    server.routes["/liar"] = lambda h: flood(h, declared=100, total=4 << 20)
    fetched = fetch_image(server.url("/liar"), POLICY)
    assert len(fetched.data) == 100


@pytest.mark.parametrize("url, error", [
    ("ftp://example.com/a.png", RemoteUrlError),
    ("file:///etc/passwd", RemoteUrlError),
    ("http://user:pw@example.com/a.png", RemoteUrlError),
    ("http://example.com/a b.png", RemoteUrlError),
    ("http://[::1/a.png", RemoteUrlError),
    ("http://169.254.169.254/latest/meta-data/", RemoteRefusedError),
    ("http://10.0.0.1/a.png", RemoteRefusedError),
    ("http://[::ffff:10.0.0.1]/a.png", RemoteRefusedError),
    ("http://0.0.0.0/a.png", RemoteRefusedError),
    ("http://2130706433/a.png", RemoteRefusedError),  # 127.0.0.1 written as a number
])
def test_bad_and_private_urls_are_refused_before_connecting(url, error):
    with pytest.raises(error):
        fetch_image(url, FetchPolicy())


def test_loopback_is_refused_unless_allowed(server):
    server.image("/a.png", png(1))
    with pytest.raises(RemoteRefusedError,
                       match="127.0.0.1 resolves to a non-public address.*VISUALSEARCH_ALLOW_PRIVATE_URLS"):
        fetch_image(server.url("/a.png"), FetchPolicy())
    with pytest.raises(RemoteRefusedError, match="localhost resolves to a non-public address"):
        fetch_image(server.url("/a.png", host="localhost"),
                    replace(POLICY, allowed_networks=parse_allowed_networks("10.0.0.0/8")))
    assert server.count("/a.png") == 0
    # An allowed address may use any port (the server's is random).
    assert fetch_image(server.url("/a.png"), POLICY).data == png(1)


def test_a_refusal_names_no_address_but_the_log_does(monkeypatch, caplog):
    """Which address an internal name has, and what kind it is, stays in the server's log."""
    fake_dns(monkeypatch, {"images.shop.test": "10.1.2.3"})
    with caplog.at_level(logging.INFO, logger="visualsearch.remote_images"):
        with pytest.raises(RemoteRefusedError, match="images.shop.test resolves to a non-public address") as caught:
            fetch_image("http://images.shop.test/a.png", FetchPolicy(allowed_networks=LOOPBACK))
    assert "10.1.2.3" not in str(caught.value) and "private" not in str(caught.value).split(";")[0]
    assert "images.shop.test resolves to 10.1.2.3, a private address" in caplog.text


@pytest.mark.parametrize("target, allowed", [
    ("http://10.0.0.1/x.png", LOOPBACK),
    ("http://169.254.169.254/latest/meta-data/iam/", LOOPBACK),
    ("http://169.254.169.254/latest/meta-data/iam/", ALL_NETWORKS),  # metadata: even when all are allowed
    ("http://[fd00:ec2::254]/latest/", ALL_NETWORKS),
    ("http://100.64.0.1/x.png", LOOPBACK),
])
def test_every_redirect_hop_is_checked(server, target, allowed):
    server.redirect("/hop", target)
    with pytest.raises(RemoteRefusedError, match="redirected to"):
        fetch_image(server.url("/hop"), replace(POLICY, allowed_networks=allowed))
    assert server.count("/hop") == 1


def test_redirects_are_followed_up_to_a_limit(server):
    server.image("/final.png", png(3))
    server.redirect("/r1", "/r2", status=301)
    server.redirect("/r2", server.url("/final.png"), status=307)
    fetched = fetch_image(server.url("/r1"), POLICY)
    assert fetched.data == png(3) and fetched.url == server.url("/final.png")
    server.redirect("/loop", "/loop")
    with pytest.raises(RemoteUpstreamError, match="more than 5 redirects"):
        fetch_image(server.url("/loop"), POLICY)
    assert server.count("/loop") == 6
    server.redirect("/to-file", "file:///etc/passwd")
    with pytest.raises(RemoteUrlError):
        fetch_image(server.url("/to-file"), POLICY)


def test_the_checked_address_is_the_one_connected_to(server, monkeypatch):
    """DNS rebinding: the name is resolved once per hop; the connection goes to the
    checked address with the URL's Host header, whatever a second lookup would say."""
    server.image("/a.png", png(4))
    answers = iter(["127.0.0.1", "10.9.9.9"])
    real = socket.getaddrinfo
    asked = []

    def rebinding(host, port, *args, **kwargs):
        if host == "cdn.shop.test":
            asked.append(host)
            return real(next(answers), port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetched = fetch_image(f"http://cdn.shop.test:{server.port}/a.png", POLICY)
    assert fetched.data == png(4) and asked == ["cdn.shop.test"]
    assert server.requests[-1][1]["Host"] == f"cdn.shop.test:{server.port}"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_sends_the_host_name_for_sni_and_checks_the_certificate(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=images.shop.test",
                    "-addext", "subjectAltName=DNS:images.shop.test"], check=True, capture_output=True)
    names = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    with ImageServer() as server:
        server.image("/a.png", png(5))
        server.httpd.socket = context.wrap_socket(server.httpd.socket, server_side=True)
        fake_dns(monkeypatch, {"images.shop.test": "127.0.0.1", "other.shop.test": "127.0.0.1"})
        monkeypatch.setattr(remote_images, "_TLS", ssl.create_default_context(cafile=str(cert)))
        fetched = fetch_image(f"https://images.shop.test:{server.port}/a.png", POLICY)
        assert fetched.data == png(5) and names == ["images.shop.test"]
        with pytest.raises(RemoteUpstreamError, match="other.shop.test"):  # not the certificate's name
            fetch_image(f"https://other.shop.test:{server.port}/a.png", POLICY)


@pytest.mark.parametrize("address, refused", [
    ("93.184.216.34", None), ("2606:2800:220:1:248:1893:25c8:1946", None),
    ("127.0.0.1", "a loopback address"), ("::1", "a loopback address"),
    ("10.0.0.1", "a private address"), ("172.16.0.1", "a private address"), ("192.168.1.1", "a private address"),
    ("100.64.0.1", "a private address"), ("fc00::1", "a private address"),
    ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
    ("169.254.169.254", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("224.0.0.1", "a multicast or unspecified address"), ("0.0.0.0", "a multicast or unspecified address"),
    ("::", "a multicast or unspecified address"), ("240.0.0.1", "a reserved address"),
    ("::ffff:127.0.0.1", "a loopback address"), ("::ffff:169.254.169.254", "a cloud metadata address"),
    ("2002:a00:1::", "a private address"),  # 6to4 of 10.0.0.1
    ("192.0.0.192", "a cloud metadata address"),  # Oracle: global to Python 3.11
    ("168.63.129.16", "a cloud metadata address"),  # Azure WireServer: a public address
    ("192.0.0.8", "a special-purpose address (192.0.0.0/24)"),
    ("169.254.170.2", "a link-local address"),  # ECS task credentials
    ("64:ff9b::a9fe:a9fe", "a cloud metadata address"),  # NAT64 of 169.254.169.254
    ("64:ff9b::a00:1", "a private address"), ("64:ff9b::7f00:1", "a loopback address"),
    ("64:ff9b::5db8:d822", None),  # NAT64 of a public address
    ("64:ff9b:1::a9fe:aa02", "a link-local address"),  # local-use NAT64 (/96) of 169.254.170.2
    ("64:ff9b:1:a9fe:a9:fe00:5db8:d822", "a cloud metadata address"),  # its /48 reading
    ("64:ff9b:1::a00:1", "a private address"),
])
def test_address_rules(address, refused):
    assert address_refusal(ipaddress.ip_address(address)) == refused


@pytest.mark.parametrize("address, refused", [
    ("169.254.169.254", "a cloud metadata address"), ("fd00:ec2::254", "a cloud metadata address"),
    ("100.100.100.200", "a cloud metadata address"), ("192.0.0.192", "a cloud metadata address"),
    ("168.63.129.16", "a cloud metadata address"), ("169.254.170.2", "a link-local address"),
    ("169.254.1.1", "a link-local address"), ("fe80::1", "a link-local address"),
    ("192.0.0.1", "a special-purpose address (192.0.0.0/24)"),
    ("::ffff:169.254.170.2", "a link-local address"), ("2002:a9fe:aa02::", "a link-local address"),
    ("64:ff9b::a9fe:a9fe", "a cloud metadata address"), ("64:ff9b::a9fe:aa02", "a link-local address"),
    ("64:ff9b:1::a9fe:a9fe", "a cloud metadata address"), ("64:ff9b::c000:c0", "a cloud metadata address"),
    ("224.0.0.1", "a multicast or unspecified address"), ("0.0.0.0", "a multicast or unspecified address"),
    # What VISUALSEARCH_ALLOW_PRIVATE_URLS=true is for:
    ("10.0.0.1", None), ("127.0.0.1", None), ("fc00::1", None), ("100.64.0.1", None),
    ("64:ff9b::a00:1", None),
])
def test_address_rules_when_every_private_address_is_allowed(address, refused):
    assert address_refusal(ipaddress.ip_address(address), ALL_NETWORKS) == refused


def test_nat64_is_checked_as_the_ipv4_address_it_reaches():
    ten = parse_allowed_networks("10.0.0.0/8")
    assert address_refusal(ipaddress.ip_address("64:ff9b::a00:1"), ten) is None
    nat64 = parse_allowed_networks("64:ff9b::/96")  # allowing the prefix does not allow what it reaches
    assert address_refusal(ipaddress.ip_address("64:ff9b::7f00:1"), nat64) == "a loopback address"


def no_connections(monkeypatch) -> list:
    """Make every outgoing connection fail the test's expectations: returns the attempts."""
    attempts: list = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.mark.parametrize("allowed", [(), LOOPBACK, ALL_NETWORKS])
def test_public_addresses_only_on_the_listed_ports(monkeypatch, allowed):
    fake_dns(monkeypatch, {"images.shop.test": "93.184.216.34", "mixed.shop.test": "127.0.0.1"})
    attempts = no_connections(monkeypatch)
    policy = FetchPolicy(allowed_networks=allowed)
    for url in ("http://images.shop.test:8080/a.png", "https://images.shop.test:22/a.png",
                "http://93.184.216.34:6379/", "https://[64:ff9b::5db8:d822]:8443/a.png"):
        with pytest.raises(RemoteRefusedError, match=r"port \d+ is not fetched.*80, 443.*VISUALSEARCH_REMOTE_PORTS"):
            fetch_image(url, policy)
    assert attempts == []


def test_allowed_private_addresses_may_use_any_port(server, monkeypatch):
    server.image("/a.png", png(1))
    fake_dns(monkeypatch, {"cdn.shop.test": "127.0.0.1", "public.shop.test": "93.184.216.34"})
    assert fetch_image(server.url("/a.png", host="cdn.shop.test"), POLICY).data == png(1)
    # A redirect from the allowed server to a public address on another port is refused.
    server.redirect("/out", "http://public.shop.test:8080/a.png")
    with pytest.raises(RemoteRefusedError, match="redirected to.*port 8080 is not fetched"):
        fetch_image(server.url("/out"), POLICY)


def test_more_ports_can_be_listed(monkeypatch):
    fake_dns(monkeypatch, {"images.shop.test": "93.184.216.34"})
    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(RemoteUpstreamError, match="cannot connect to images.shop.test"):
        fetch_image("http://images.shop.test:8080/a.png", FetchPolicy(ports=parse_ports("80,443,8080")))
    assert attempts == [("93.184.216.34", 8080)]


def test_refused_and_timed_out_connections_read_alike(monkeypatch, caplog):
    """Which ports answer and which drop the connection stays in the server's log."""
    fake_dns(monkeypatch, {"images.shop.test": "93.184.216.34"})
    errors = []
    for failure in (ConnectionRefusedError(111, "Connection refused"), TimeoutError("timed out"),
                    OSError(113, "No route to host")):
        def fail(address, *args, failure=failure, **kwargs):
            raise failure

        monkeypatch.setattr(socket, "create_connection", fail)
        with caplog.at_level(logging.INFO, logger="visualsearch.remote_images"):
            with pytest.raises(RemoteUpstreamError) as caught:
                fetch_image("http://images.shop.test/a.png", FetchPolicy())
        errors.append((type(caught.value), caught.value.code, str(caught.value)))
    assert len(set(errors)) == 1 and errors[0][1] == "remote_unreachable"
    assert "Connection refused" in caplog.text and "No route to host" in caplog.text


def test_port_and_concurrency_settings():
    assert parse_ports("80, 443,8080") == (80, 443, 8080) and parse_ports([443]) == (443,)
    for bad in ("", "http", "0", "65536", "80;443"):
        with pytest.raises(ConfigurationError):
            parse_ports(bad)
    defaults = Settings()
    assert defaults.remote_ports == (80, 443) and defaults.remote_api_concurrency == 4
    configured = Settings.from_env({"VISUALSEARCH_REMOTE_PORTS": "443,8443",
                                    "VISUALSEARCH_REMOTE_API_CONCURRENCY": "2"})
    assert configured.remote_ports == (443, 8443) and configured.remote_api_concurrency == 2
    assert FetchPolicy.from_settings(configured).ports == (443, 8443)
    with pytest.raises(ConfigurationError, match="VISUALSEARCH_REMOTE_API_CONCURRENCY"):
        Settings.from_env({"VISUALSEARCH_REMOTE_API_CONCURRENCY": "0"})


def test_allowed_networks_setting():
    assert parse_allowed_networks("") == () and parse_allowed_networks("no") == ()
    assert parse_allowed_networks("true") == ALL_NETWORKS
    allowed = parse_allowed_networks("127.0.0.1, 10.0.0.0/8")
    assert address_refusal(ipaddress.ip_address("10.2.3.4"), allowed) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.2"), allowed) == "a loopback address"
    assert address_refusal(ipaddress.ip_address("169.254.169.254"), ALL_NETWORKS) == "a cloud metadata address"
    with pytest.raises(Exception, match="not an address or network"):
        parse_allowed_networks("localhost")


def test_fetcher_keeps_order_and_limits_each_host(server, monkeypatch):
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}
    overall = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow_image(handler):
        host = handler.headers["Host"].split(":")[0]
        with lock:
            in_flight[host] = in_flight.get(host, 0) + 1
            most[host] = max(most.get(host, 0), in_flight[host])
            overall["now"] += 1
            overall["most"] = max(overall["most"], overall["now"])
        time.sleep(0.25)
        with lock:
            in_flight[host] -= 1
            overall["now"] -= 1
        body = handler.path.encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.end_headers()
        handler.wfile.write(body)

    for number in range(6):
        server.routes[f"/{number}"] = slow_image
    fake_dns(monkeypatch, {"a.shop.test": "127.0.0.1", "b.shop.test": "127.0.0.1"})
    urls = [server.url(f"/{n}", host=h) for n in range(6) for h in ("a.shop.test", "b.shop.test")]
    with RemoteFetcher(replace(POLICY, concurrency=8, per_host=2)) as fetcher:
        bodies = [fetched.data for fetched in fetcher.map(fetcher.fetch, urls)]
    assert bodies == [f"/{n}".encode() for n in range(6) for _ in range(2)]
    assert most == {"a.shop.test": 2, "b.shop.test": 2} and overall["most"] == 4


# --- indexing --------------------------------------------------------------------------


@pytest.fixture
def remote_settings(tiny_settings):
    return replace(tiny_settings, allow_private_urls=LOOPBACK, remote_timeout=1.0, remote_deadline=3.0)


def remote_catalogue(tmp_path: Path, server: ImageServer) -> Path:
    server.image("/etag.png", png(10), etag='"e1"')
    server.image("/dated.png", png(11), last_modified=1_700_000_000)
    server.image("/plain.png", png(12))
    tmp_path.mkdir(parents=True, exist_ok=True)
    make_image(tmp_path / "local.png", seed=13)
    rows = [{"sku": "ETAG", "image": server.url("/etag.png"), "title": "validated by ETag"},
            {"sku": "DATED", "image": server.url("/dated.png")},
            {"sku": "PLAIN", "image": server.url("/plain.png")},
            {"sku": "LOCAL", "image": "local.png"}]
    return write_catalogue(tmp_path, rows)


def test_index_images_at_urls_and_skip_unchanged_ones(remote_settings, tmp_path, server):
    manifest = remote_catalogue(tmp_path / "cat", server)
    vs = VisualSearch(replace(remote_settings, remote_recheck=0))  # every run revalidates (see the recheck tests)
    first = vs.index(manifest)
    assert first.failures == [] and first.embedded == 4 and first.unchanged == 0
    second = vs.index(manifest)
    assert second.failures == [] and second.embedded == 0 and second.reused == 0 and second.unchanged == 4
    # ETag and Last-Modified: asked again, answered 304 (no body); no validator: downloaded
    # again, recognised by its hash, never embedded again.
    assert server.count("/etag.png") == 2 and server.count("/etag.png", 304) == 1
    assert server.count("/dated.png") == 2 and server.count("/dated.png", 304) == 1
    assert server.count("/plain.png", 200) == 2
    conditional = [headers for path, headers in server.requests if path == "/etag.png"][-1]
    assert conditional["If-None-Match"] == '"e1"'
    # The image changes on the server: a new ETag, a 200, a new vector.
    server.image("/etag.png", png(20), etag='"e2"')
    third = vs.index(manifest)
    assert third.embedded == 1 and third.unchanged == 3
    assert vs.search(png(20), top_k=1).hits[0].sku == "ETAG"


def test_failed_urls_are_reported_like_files(remote_settings, tmp_path, server):
    server.image("/ok.png", png(1))
    server.image("/page.html", b"<html></html>", content_type="text/html")
    rows = [{"sku": "OK", "image": server.url("/ok.png")},
            {"sku": "GONE", "image": server.url("/gone.png")},
            {"sku": "PAGE", "image": server.url("/page.html")},
            {"sku": "META", "image": "http://169.254.169.254/latest/meta-data/"}]
    vs = VisualSearch(remote_settings)
    report = vs.index(write_catalogue(tmp_path / "cat", rows))
    assert report.embedded == 1
    codes = {failure.sku: (failure.code, failure.image) for failure in report.failures}
    assert codes == {"GONE": ("remote_not_found", server.url("/gone.png")),
                     "PAGE": ("remote_not_image", server.url("/page.html")),
                     "META": ("remote_refused", "http://169.254.169.254/latest/meta-data/")}
    logged = [json.loads(line) for line in vs.failures_path.read_text().splitlines()]
    assert {(entry["sku"], entry["code"], entry["image"]) for entry in logged} == {
        (sku, code, image) for sku, (code, image) in codes.items()}
    assert vs.product("GONE").images[0].status == "failed"


def test_existing_catalogue_gains_the_validator_column(remote_settings, tmp_path):
    make_image(tmp_path / "a.png", seed=1)
    VisualSearch(remote_settings).index(write_catalogue(tmp_path, [{"sku": "A", "image": "a.png"}]))
    engine = create_engine(remote_settings.catalogue_url)
    with engine.begin() as connection:  # a catalogue made before the column existed
        connection.execute(text("ALTER TABLE product_images DROP COLUMN source_etag"))
        connection.execute(text("DROP TABLE alembic_version"))  # (and so before schema migrations)
    # Read-only (the web app), it is not changed and still serves its products.
    reader = VisualSearch(remote_settings, read_only=True)
    image_id = reader.product("A").images[0].id
    assert reader.image_url(image_id) is None and reader.image_file(image_id) is not None
    assert "source_etag" not in {c["name"] for c in inspect(engine).get_columns("product_images")}
    VisualSearch(remote_settings)  # a writer adds it
    assert "source_etag" in {c["name"] for c in inspect(engine).get_columns("product_images")}
    engine.dispose()


# --- the web app -----------------------------------------------------------------------


@pytest.fixture
def client(remote_settings, small_catalogue):
    VisualSearch(remote_settings).index(small_catalogue)
    return create_app({"TESTING": True}, settings=remote_settings).test_client()


def test_api_search_by_image_url(client, small_catalogue, server):
    server.image("/query.png", (small_catalogue.parent / "img" / "p2-1.png").read_bytes())
    response = client.post("/api/v1/search", data={"image_url": server.url("/query.png"), "top_k": "3"})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["results"][0]["sku"] == "P2" and len(body["results"]) == 3
    assert set(body["took_ms"]) == {"fetch", "decode", "embed", "search", "total"}
    assert body["took_ms"]["total"] >= body["took_ms"]["fetch"]


@pytest.mark.parametrize("path, status, code", [
    ("/missing.png", 422, "remote_not_found"),
    ("/slow.png", 504, "remote_timeout"),
    ("/broken.png", 502, "remote_http_error"),
    ("/big.png", 413, "remote_too_large"),
    ("/page.html", 415, "remote_not_image"),
    ("/undecodable.png", 422, "undecodable_image"),
])
def test_api_image_url_errors(client, server, path, status, code):
    server.routes["/slow.png"] = lambda h: (time.sleep(2), h.send_error(500))
    server.routes["/broken.png"] = lambda h: h.send_error(500)
    server.routes["/big.png"] = lambda h: flood(h, declared=None, total=20 << 20)
    server.image("/page.html", b"<html></html>", content_type="text/html")
    server.image("/undecodable.png", png(1)[:60])
    response = client.post("/api/v1/search", data={"image_url": server.url(path)})
    assert response.status_code == status
    assert response.get_json()["error"]["code"] == code


@pytest.mark.parametrize("url, code", [
    ("ftp://example.com/a.png", "remote_bad_url"),
    ("http://10.0.0.1/a.png", "remote_refused"),
    ("http://169.254.169.254/latest/meta-data/", "remote_refused"),
])
def test_api_refuses_bad_and_private_urls(client, url, code):
    response = client.post("/api/v1/search", data={"image_url": url})
    assert response.status_code == 400 and response.get_json()["error"]["code"] == code


def test_api_refusal_hides_the_address(client, monkeypatch):
    fake_dns(monkeypatch, {"db.internal.test": "10.1.2.3"})
    response = client.post("/api/v1/search", data={"image_url": "http://db.internal.test/a.png"})
    message = response.get_json()["error"]["message"]
    assert response.status_code == 400 and "non-public address" in message and "10.1.2.3" not in message
    port = client.post("/api/v1/search", data={"image_url": "http://93.184.216.34:22/"})
    assert port.status_code == 400 and "VISUALSEARCH_REMOTE_PORTS" in port.get_json()["error"]["message"]


def test_api_url_fetches_at_once_are_bounded(remote_settings, small_catalogue, server):
    settings = replace(remote_settings, remote_api_concurrency=2, remote_timeout=5.0, remote_deadline=10.0)
    VisualSearch(settings).index(small_catalogue)
    app = create_app({"TESTING": True}, settings=settings)
    photo = (small_catalogue.parent / "img" / "p2-1.png").read_bytes()
    release = threading.Event()

    def slow(handler):  # sleeps until the test has seen the third request turned away
        release.wait(5)
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", str(len(photo)))
        handler.end_headers()
        handler.wfile.write(photo)

    server.routes["/slow.png"] = slow
    statuses: list[int] = []

    def search():
        statuses.append(app.test_client().post("/api/v1/search", data={"image_url": server.url("/slow.png")})
                        .status_code)

    holders = [threading.Thread(target=search) for _ in range(2)]
    for thread in holders:
        thread.start()
    try:
        waited = time.monotonic()
        while server.count("/slow.png") < 2 and time.monotonic() - waited < 5:
            time.sleep(0.02)
        assert server.count("/slow.png") == 2
        busy = app.test_client().post("/api/v1/search", data={"image_url": server.url("/slow.png")})
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        error = busy.get_json()["error"]
        assert error["code"] == "remote_fetch_busy"
        assert "VISUALSEARCH_REMOTE_API_CONCURRENCY" in error["message"] and "'image'" in error["message"]
        assert server.count("/slow.png") == 2  # turned away without fetching
        upload = app.test_client().post("/api/v1/search", data={"image": (io.BytesIO(photo), "q.png")})
        assert upload.status_code == 200  # uploads take no slot
    finally:
        release.set()
        for thread in holders:
            thread.join(10)
    assert statuses == [200, 200]
    # The slots are given back, failed fetches' included.
    assert app.test_client().post("/api/v1/search", data={"image_url": server.url("/gone.png")}).status_code == 422
    server.image("/now.png", photo)
    for _ in range(3):
        assert app.test_client().post("/api/v1/search", data={"image_url": server.url("/now.png")}).status_code == 200


def test_api_wants_exactly_one_photo(client, small_catalogue, server):
    photo = (small_catalogue.parent / "img" / "p2-1.png").read_bytes()
    both = client.post("/api/v1/search", data={"image": (io.BytesIO(photo), "q.png"),
                                               "image_url": server.url("/q.png")})
    assert both.status_code == 400 and both.get_json()["error"]["code"] == "missing_image"
    neither = client.post("/api/v1/search", data={"top_k": "3"})
    assert neither.status_code == 400 and "image_url" in neither.get_json()["error"]["message"]


def test_remote_images_are_served_by_redirect(remote_settings, tmp_path, server):
    manifest = remote_catalogue(tmp_path / "cat", server)
    vs = VisualSearch(remote_settings)
    vs.index(manifest)
    client = create_app({"TESTING": True}, settings=remote_settings).test_client()
    remote_id = vs.product("ETAG").images[0].id
    response = client.get(f"/images/{remote_id}")
    assert response.status_code == 302 and response.headers["Location"] == server.url("/etag.png")
    assert "https:" in response.headers["Content-Security-Policy"]
    local = client.get(f"/images/{vs.product('LOCAL').images[0].id}")
    assert local.status_code == 200 and local.mimetype == "image/png"
    local.close()
    page = client.get("/products/ETAG").get_data(as_text=True)
    assert f'src="/images/{remote_id}"' in page


# --- re-checking indexed image URLs (VISUALSEARCH_REMOTE_RECHECK, index --recheck-urls) ---


DAY = 86400


def checked_at(settings, image_id: int) -> int | None:
    engine = create_engine(settings.catalogue_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text("SELECT source_checked_at FROM product_images WHERE id = :id"),
                                      {"id": image_id}).scalar()
    finally:
        engine.dispose()


def age_checks(settings, seconds: int) -> None:
    """Move every recorded URL check ``seconds`` into the past."""
    engine = create_engine(settings.catalogue_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE product_images SET source_checked_at = source_checked_at - :s "
                                "WHERE source_checked_at IS NOT NULL"), {"s": seconds})
    engine.dispose()


@pytest.mark.parametrize("checked, age, max_age, due", [
    (None, 0, 7 * DAY, True),          # never recorded (indexed before the column existed)
    (1000, 0, 7 * DAY, False),
    (1000, 7 * DAY - 1, 7 * DAY, False),  # within the setting: never asked
    (1000, 14 * DAY, 7 * DAY, True),   # waits at most twice the setting
    (1000, 0, 0, True),                # 0 / --recheck-urls: every run
    (1000, -DAY, 7 * DAY, True),       # recorded in the future: a clock set back
])
@pytest.mark.parametrize("image_id", [0, 1, 7, 123_456_789])
def test_url_check_due(image_id, checked, age, max_age, due):
    now = (checked or 0) + age
    assert url_recheck.url_check_due(image_id, checked, now=now, max_age=max_age) is due


def test_url_checks_spread_over_the_nights():
    """4,000 URLs fetched by one import on night 0, then a run every night: the week
    after the first 7 days each night asks about a seventh of them, never more; the
    waves then blur into an even share (about 1/11: the mean wait is 10.5 days)."""
    images = range(1, 4001)
    last = dict.fromkeys(images, 0)
    per_night = []
    for night in range(1, 91):
        due = [image for image in images
               if url_recheck.url_check_due(image, last[image], now=night * DAY, max_age=7 * DAY)]
        last.update(dict.fromkeys(due, night * DAY))
        per_night.append(len(due))
    assert per_night[:7] == [0] * 7
    assert all(500 <= count <= 650 for count in per_night[7:14]), per_night
    assert max(per_night) <= 650
    settled = per_night[60:]
    assert all(280 <= count <= 450 for count in settled) and 330 <= sum(settled) / len(settled) <= 400


def test_recheck_setting_takes_durations():
    assert Settings().remote_recheck == 7 * DAY
    assert Settings.from_env({"VISUALSEARCH_REMOTE_RECHECK": "24h"}).remote_recheck == DAY
    assert Settings.from_env({"VISUALSEARCH_REMOTE_RECHECK": "0"}).remote_recheck == 0
    with pytest.raises(ConfigurationError, match="VISUALSEARCH_REMOTE_RECHECK"):
        Settings.from_env({"VISUALSEARCH_REMOTE_RECHECK": "a week"})


def test_recently_checked_urls_are_not_asked_again(remote_settings, tmp_path, server):
    assert remote_settings.remote_recheck == 7 * DAY  # the default
    manifest = remote_catalogue(tmp_path / "cat", server)
    vs = VisualSearch(remote_settings)
    before = time.time()
    assert vs.index(manifest).embedded == 4
    assert len(server.requests) == 3
    remote = vs.product("ETAG").images[0].id
    assert before - 1 <= checked_at(remote_settings, remote) <= time.time() + 1
    assert checked_at(remote_settings, vs.product("LOCAL").images[0].id) is None

    second = vs.index(manifest)
    assert second.failures == [] and second.unchanged == 4 and second.embedded == second.reused == 0
    assert len(server.requests) == 3  # not one request

    # The shop changes an image: its CDN gives it a new URL (Shopify's ?v=), always fetched.
    server.image("/etag.png", png(20), etag='"e2"')
    rows = [{"sku": "ETAG", "image": server.url("/etag.png?v=2")}, {"sku": "DATED", "image": server.url("/dated.png")},
            {"sku": "PLAIN", "image": server.url("/plain.png")}, {"sku": "LOCAL", "image": "local.png"}]
    third = vs.index(write_catalogue(tmp_path / "cat", rows, name="next.csv"))
    assert third.embedded == 1 and third.failures == []
    assert [path for path, _ in server.requests[3:]] == ["/etag.png?v=2"]
    assert "If-None-Match" not in server.requests[-1][1]  # a new image: a plain GET
    assert vs.search(png(20), top_k=1).hits[0].sku == "ETAG"


@pytest.mark.parametrize("how", ["recheck_urls", "recheck_0", "expired"])
def test_urls_are_revalidated_when_asked_or_when_the_check_expired(remote_settings, tmp_path, server, how):
    manifest = remote_catalogue(tmp_path / "cat", server)
    settings = replace(remote_settings, remote_recheck=0) if how == "recheck_0" else remote_settings
    vs = VisualSearch(settings)
    vs.index(manifest)
    # "expired": past every image's wait (7 to 14 days); otherwise a little, so that a new check shows.
    age_checks(settings, 14 * DAY if how == "expired" else 10)
    first_check = checked_at(settings, vs.product("ETAG").images[0].id)
    report = vs.index(manifest, recheck_urls=how == "recheck_urls")
    assert report.unchanged == 4 and report.embedded == report.reused == 0
    # Conditional GETs: 304 where there are validators, a download recognised by its hash where not.
    assert server.count("/etag.png", 304) == 1 and server.count("/dated.png", 304) == 1
    assert server.count("/plain.png", 200) == 2
    assert [h for p, h in server.requests if p == "/etag.png"][-1]["If-None-Match"] == '"e1"'
    assert checked_at(settings, vs.product("ETAG").images[0].id) > first_check  # recorded again
    assert len(server.requests) == 6
    # Checked just now: the next plain run (unless the setting is 0) asks nothing.
    vs.index(manifest)
    assert len(server.requests) == (9 if how == "recheck_0" else 6)


def test_cli_recheck_urls(remote_settings, tmp_path, server, monkeypatch):
    from click.testing import CliRunner

    from indexer.cli import main

    manifest = remote_catalogue(tmp_path / "cat", server)
    for name, value in {"DATA_DIR": remote_settings.data_dir, "BACKBONE": remote_settings.backbone,
                        "WEIGHTS": remote_settings.weights, "WORKERS": "0",
                        "ALLOW_PRIVATE_URLS": "127.0.0.1"}.items():
        monkeypatch.setenv(f"VISUALSEARCH_{name}", str(value))
    runner = CliRunner()

    def index(*args: str) -> dict:
        result = runner.invoke(main, ["index", str(manifest), "--json", *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    assert index()["embedded"] == 4 and len(server.requests) == 3
    assert index("--prune")["unchanged"] == 4 and len(server.requests) == 3
    assert index("--recheck-urls")["unchanged"] == 4 and len(server.requests) == 6
    assert index("--prune", "--recheck-urls")["unchanged"] == 4 and len(server.requests) == 9
    assert server.count("/etag.png", 304) == 2


def test_existing_catalogue_gains_the_check_time_column(remote_settings, tmp_path, server):
    manifest = remote_catalogue(tmp_path / "cat", server)
    vs = VisualSearch(remote_settings)
    vs.index(manifest)
    engine = create_engine(remote_settings.catalogue_url)
    with engine.begin() as connection:  # a catalogue made before the column existed
        connection.execute(text("ALTER TABLE product_images DROP COLUMN source_checked_at"))
        connection.execute(text("DROP TABLE alembic_version"))  # (and so before schema migrations)
    reader = VisualSearch(remote_settings, read_only=True)  # read-only: unchanged, still serves
    assert reader.product("ETAG").images[0].status == "indexed"
    assert "source_checked_at" not in {c["name"] for c in inspect(engine).get_columns("product_images")}
    engine.dispose()
    vs = VisualSearch(remote_settings)  # a writer adds it, empty: the next run checks every URL once
    report = vs.index(manifest)
    assert report.unchanged == 4 and len(server.requests) == 6 and server.count("/etag.png", 304) == 1
    assert checked_at(remote_settings, vs.product("ETAG").images[0].id) is not None
    vs.index(manifest)
    assert len(server.requests) == 6


def test_one_fetch_pool_serves_every_chunk_and_is_closed(remote_settings, tmp_path, server, monkeypatch):
    made: list[RemoteFetcher] = []
    closed: list[RemoteFetcher] = []

    class CountingFetcher(RemoteFetcher):
        def __init__(self, policy):
            super().__init__(policy)
            made.append(self)

        def close(self):
            closed.append(self)
            super().close()

    monkeypatch.setattr(indexing, "RemoteFetcher", CountingFetcher)
    monkeypatch.setattr(indexing, "MANIFEST_CHUNK_ROWS", 1)  # a chunk per product
    manifest = remote_catalogue(tmp_path / "cat", server)
    vs = VisualSearch(remote_settings)
    assert vs.index(manifest).embedded == 4
    assert len(made) == 1 and closed == made

    upsert = indexing.catalogue.upsert_products
    calls = []

    def failing_upsert(session, records):
        calls.append(records)
        if len(calls) == 2:
            raise RuntimeError("the disk went away")
        return upsert(session, records)

    monkeypatch.setattr(indexing.catalogue, "upsert_products", failing_upsert)
    with pytest.raises(RuntimeError, match="disk went away"):
        vs.index(manifest, recheck_urls=True)
    assert len(made) == 2 and closed == made  # closed on the error too
