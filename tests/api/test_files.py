"""Local-storage outputs are served only through signed, unexpired URLs, and never outside the root."""

from __future__ import annotations

import time
from urllib.parse import parse_qs, urlparse

from fastapi.testclient import TestClient

from shared.storage import get_storage, sign


def test_signed_url_serves_the_file_and_refuses_tampering(api: TestClient) -> None:
    storage = get_storage()
    storage.put("jobs/abc/0.png", b"\x89PNG fake", "image/png")
    url = urlparse(storage.url("jobs/abc/0.png"))
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    ok = api.get(url.path, params=query)
    assert ok.status_code == 200 and ok.content == b"\x89PNG fake"

    tampered = api.get(url.path, params={**query, "sig": "0" * 64})
    assert tampered.status_code == 403
    other = api.get("/files/jobs/abc/1.png", params=query)
    assert other.status_code == 403

    past = int(time.time()) - 10
    expired = api.get(url.path, params={"expires": past, "sig": sign("test-secret", "jobs/abc/0.png", past)})
    assert expired.status_code == 403
    assert expired.json()["error"]["code"] == "url_expired"


def test_no_path_escapes_the_storage_root(api: TestClient) -> None:
    future = int(time.time()) + 100
    for key in ("../darkroom.db", "jobs/../../etc/passwd", "/etc/passwd", "jobs/%2e%2e/x"):
        response = api.get(f"/files/{key}", params={"expires": future, "sig": sign("test-secret", key, future)})
        assert response.status_code in (403, 404), (key, response.status_code)
        assert b"root:" not in response.content
