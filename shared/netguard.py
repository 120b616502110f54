"""SSRF guard for URLs darkroom fetches or calls on a client's behalf (image inputs, webhooks).

`check_url` accepts only http(s) URLs whose host resolves exclusively to public addresses: loopback,
private, link-local, multicast, reserved and unspecified ranges are refused, and so are the cloud metadata
endpoints (169.254.169.254, fd00:ec2::254). Numeric host spellings that resolvers accept (2130706433,
0x7f.1, 0177.0.0.1) are caught because the check runs on the addresses the host resolves to, not on its
text. A checked URL is only safe if the connection goes to the checked address, so `guarded_client`
pins each connection to the address that was checked (defeating DNS rebinding) and re-checks every
redirect target.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
ALLOWED_SCHEMES = ("http", "https")
MAX_REDIRECTS = 5


class UnsafeURL(ValueError):
    """The URL may not be fetched: wrong scheme, unresolvable, or pointing inside the network."""


@dataclass(frozen=True)
class CheckedURL:
    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public(address.ipv4_mapped)
    return address not in METADATA and address.is_global and not address.is_multicast


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, as the operating system's resolver sees it."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeURL(f"host {host!r} does not resolve") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def check_url(url: str, *, allow_private: bool = False) -> CheckedURL:
    """Refuse `url` unless it is http(s) and its host resolves only to public addresses.

    `allow_private` admits private and loopback addresses (for a deployment that calls its own network
    on purpose); cloud metadata endpoints stay refused even then.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {url!r}") from exc
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"only http and https URLs are allowed, got {parts.scheme!r}")
    host = parts.hostname
    if not host:
        raise UnsafeURL("URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("URLs with credentials are not allowed")
    port = port or (443 if parts.scheme.lower() == "https" else 80)
    addresses = resolve(host, port)
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve")
    for address in addresses:
        if address in METADATA or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped in METADATA):
            raise UnsafeURL(f"host {host!r} is a cloud metadata address")
        if not allow_private and not is_public(address):
            raise UnsafeURL(f"host {host!r} resolves to a non-public address ({address})")
    return CheckedURL(url=url, scheme=parts.scheme.lower(), host=host, port=port, address=addresses[0])


class PinnedTransport(httpx.HTTPTransport):
    """Checks each request's URL and connects to the checked address, whatever DNS says a moment later.

    The request keeps its Host header and, for https, its server name (SNI and certificate checks use the
    original host name), so only the address is pinned.
    """

    def __init__(self, *, allow_private: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.allow_private = allow_private

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        checked = check_url(str(request.url), allow_private=self.allow_private)
        host = f"[{checked.address}]" if checked.address.version == 6 else str(checked.address)
        request.url = request.url.copy_with(host=host)
        request.headers["Host"] = request.headers.get("Host") or checked.host
        request.extensions = {**request.extensions, "sni_hostname": checked.host}
        return super().handle_request(request)


def guarded_client(*, allow_private: bool = False, timeout: float = 10.0, **kwargs: Any) -> httpx.Client:
    """An httpx client for untrusted URLs: every request and every redirect hop is checked and pinned."""
    return httpx.Client(
        transport=PinnedTransport(allow_private=allow_private),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        timeout=timeout,
        **kwargs,
    )
