"""Fetching an input image from a client-given URL without becoming an SSRF proxy.

Every address the host resolves to must be public (no private, loopback, link-local, metadata, multicast
or reserved range); the connection goes to the checked address itself (the name is kept for the Host
header and TLS), so a DNS answer that changes between check and connect cannot slip through. Redirects
are followed by hand, each target checked again. Total time and size are capped. `fetch_image` is the one
entry point, so a shared guard (shared/netguard.py) can replace the checks here later.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from shared.errors import InvalidRequest

MAX_REDIRECTS = 3
# Cloud metadata addresses are link-local or private already; listed so the refusal names them.
METADATA_ADDRESSES = frozenset({"169.254.169.254", "fd00:ec2::254", "100.100.100.200"})


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float
    max_bytes: int
    allow_hosts: frozenset[str] = frozenset()  # exact "host:port" pairs, for tests and internal mirrors


def _port(scheme: str, port: int | None) -> int:
    return port if port is not None else (443 if scheme == "https" else 80)


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if address in METADATA_ADDRESSES or str(ip) in METADATA_ADDRESSES:
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local or ip.is_loopback)


def resolve_checked(url: str, field: str, policy: FetchPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, address to connect to), or a 422 saying why this URL may not be fetched."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    try:
        port = _port(scheme, parts.port)
    except ValueError as exc:
        raise InvalidRequest(f"{field}: invalid port in URL") from exc
    if not host or scheme not in ("https", "http"):
        raise InvalidRequest(f"{field}: only https:// URLs, data: URIs or upload keys are accepted")
    if parts.username or parts.password:
        raise InvalidRequest(f"{field}: URLs with credentials are not accepted")
    allowed = f"{host}:{port}" in policy.allow_hosts
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidRequest(f"{field}: host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not allowed:
        for address in addresses:
            if not _public(address):
                raise InvalidRequest(f"{field}: host {host!r} resolves to a non-public address ({address}); refused")
    if scheme == "http" and not allowed:
        raise InvalidRequest(f"{field}: only https:// URLs are accepted")
    return scheme, host, port, addresses[0]


def _download(url: str, field: str, policy: FetchPolicy, deadline: float) -> tuple[bytes, str | None]:
    """One request to the checked address: (body, redirect target or None)."""
    scheme, host, port, address = resolve_checked(url, field, policy)
    parts = urlsplit(url)
    ip_host = f"[{address}]" if ":" in address else address
    target = parts._replace(netloc=f"{ip_host}:{port}").geturl()
    host_header = host if parts.port is None else f"{host}:{port}"
    remaining = max(0.1, deadline - time.monotonic())
    timeout = httpx.Timeout(remaining, connect=min(5.0, remaining))
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client,
            client.stream("GET", target, headers={"Host": host_header}, extensions=extensions) as response,
        ):
            if response.is_redirect:
                location = response.headers.get("location", "")
                return b"", urljoin(url, location)
            if response.status_code != 200:
                raise InvalidRequest(f"{field}: fetching the URL gave HTTP {response.status_code}")
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > policy.max_bytes:
                raise InvalidRequest(f"{field}: the image at the URL is over {policy.max_bytes} bytes")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > policy.max_bytes:
                    raise InvalidRequest(f"{field}: the image at the URL is over {policy.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise InvalidRequest(f"{field}: fetching the URL took over {policy.timeout:g} s")
            return bytes(body), None
    except httpx.TimeoutException as exc:
        raise InvalidRequest(f"{field}: fetching the URL took over {policy.timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"{field}: fetching the URL failed ({type(exc).__name__})") from exc


def fetch_image(url: str, field: str, policy: FetchPolicy) -> bytes:
    """The bytes at `url`, following at most MAX_REDIRECTS redirects, each one checked like the first."""
    deadline = time.monotonic() + policy.timeout
    for _ in range(MAX_REDIRECTS + 1):
        body, redirect = _download(url, field, policy, deadline)
        if redirect is None:
            return body
        url = redirect
    raise InvalidRequest(f"{field}: the URL redirects more than {MAX_REDIRECTS} times")
