"""The SSRF guard, without the network: only literal addresses and `localhost` are ever resolved."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from shared.netguard import UnsafeURL, check_url, guarded_client

REFUSED = [
    ("file:///etc/passwd", "only http and https"),
    ("gopher://127.0.0.1/", "only http and https"),
    ("ftp://93.184.216.34/", "only http and https"),
    ("http://127.0.0.1/", "non-public"),
    ("http://127.1/", "non-public"),
    ("http://2130706433/", "non-public"),  # decimal
    ("http://0177.0.0.1/", "non-public"),  # octal
    ("http://0x7f.0.0.1/", "non-public"),  # hex
    ("http://0x7f000001/", "non-public"),
    ("http://0.0.0.0/", "non-public"),
    ("http://[::1]/", "non-public"),
    ("http://[::]/", "non-public"),
    ("http://[::ffff:127.0.0.1]/", "non-public"),
    ("http://localhost:8000/", "non-public"),  # a name that resolves to loopback
    ("http://10.0.0.1/", "non-public"),
    ("http://172.16.5.4/", "non-public"),
    ("http://192.168.1.1/", "non-public"),
    ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT
    ("http://169.254.10.10/", "non-public"),  # link-local
    ("http://[fe80::1]/", "non-public"),
    ("http://[fc00::1]/", "non-public"),
    ("http://224.0.0.1/", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://[fd00:ec2::254]/", "metadata"),
    ("http://user:pw@93.184.216.34/", "credentials"),
    ("http:///nohost", "no host"),
    ("http://93.184.216.34:99999/", "not a valid URL"),
]
ALLOWED = [
    "http://93.184.216.34/",
    "https://93.184.216.34:8443/path?q=1",
    "http://[2606:2800:220:1:248:1893:25c8:1946]/",
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=reason):
        check_url(url)


@pytest.mark.parametrize("url", ALLOWED)
def test_public_addresses_are_allowed(url: str) -> None:
    assert check_url(url).address.is_global


def test_allow_private_admits_the_network_but_never_the_metadata_service() -> None:
    assert str(check_url("http://localhost/", allow_private=True).address) in ("127.0.0.1", "::1")
    assert str(check_url("http://10.0.0.1/", allow_private=True).address) == "10.0.0.1"
    for url in ("http://169.254.169.254/", "http://[fd00:ec2::254]/", "http://[::ffff:169.254.169.254]/"):
        with pytest.raises(UnsafeURL, match="metadata"):
            check_url(url, allow_private=True)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        body = f"host={self.headers['Host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def local_server() -> Iterator[int]:
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_the_client_pins_the_checked_address_and_keeps_the_host_name(local_server: int) -> None:
    with guarded_client(allow_private=True) as client:
        response = client.get(f"http://localhost:{local_server}/")
    assert response.status_code == 200
    assert response.text == f"host=localhost:{local_server}"


def test_the_client_refuses_loopback_by_default(local_server: int) -> None:
    with guarded_client() as client, pytest.raises(UnsafeURL):
        client.get(f"http://localhost:{local_server}/")


def test_every_redirect_hop_is_checked(local_server: int) -> None:
    # The first hop is allowed (private allowed here); the redirect to the metadata service never is,
    # and it is refused before any connection is attempted.
    with guarded_client(allow_private=True) as client, pytest.raises(UnsafeURL, match="metadata"):
        client.get(f"http://127.0.0.1:{local_server}/redirect")
