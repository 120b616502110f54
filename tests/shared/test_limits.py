"""Per-tenant limits on real Redis and databases: exact under concurrency, per-tenant overrides, periods."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared import limits
from shared.errors import InvalidRequest, TooManyRequests
from shared.tenant_config import reset_tenant_config
from tests.support import reset_caches


def configure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, toml: str = "", **env: str) -> None:
    if toml:
        path = tmp_path / "tenants.toml"
        path.write_text(toml)
        monkeypatch.setenv("DARKROOM_TENANT_POLICY_FILE", str(path))
    for name, value in env.items():
        monkeypatch.setenv(f"DARKROOM_{name.upper()}", value)
    reset_caches()
    reset_tenant_config()


def attempt(call: Any) -> str:
    try:
        call()
    except TooManyRequests as exc:
        assert int(exc.headers["Retry-After"]) >= 1
        return exc.code
    return "ok"


def test_the_tenant_file_overrides_the_global_defaults(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    toml = '[tenants.acme]\nrate_per_minute = 600\nmax_running = 2\nquota_period = "month"\nmax_priority = "normal"\n'
    configure(monkeypatch, tmp_path, toml, tenant_rate_per_minute="60", tenant_max_queued="10")
    acme, other = limits.limits_for("acme"), limits.limits_for("globex")
    assert (acme.rate_per_minute, acme.max_queued, acme.max_running) == (600, 10, 2)
    assert (acme.quota_period, acme.max_priority) == ("month", "normal")
    assert (other.rate_per_minute, other.max_running, other.quota_period, other.max_priority) == (60, 0, "day", "high")


@pytest.mark.parametrize(
    ("line", "named"),
    [("max_queued = -1", "max_queued"), ('quota_period = "fortnight"', "quota_period"), ('max_priority = "top"', "")],
)
def test_a_bad_value_in_the_tenant_file_names_the_tenant_and_key(
    darkroom_env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, line: str, named: str
) -> None:
    configure(monkeypatch, tmp_path, f"[tenants.acme]\n{line}\n")
    with pytest.raises(ValueError, match=f"tenant 'acme': {named or 'max_priority'}"):
        limits.limits_for("acme")


def test_a_priority_above_the_tenants_maximum_is_refused_naming_priority(darkroom_env: dict[str, Any]) -> None:
    capped = limits.TenantLimits(0, 0, 0, 0, "day", "normal")
    limits.check_priority("normal", capped)
    with pytest.raises(InvalidRequest, match=r"^priority: 'high' is above") as refused:
        limits.check_priority("high", capped)
    assert refused.value.code == "priority_not_allowed"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_rate_admits_exactly_its_limit_of_concurrent_requests(darkroom_env: dict[str, Any]) -> None:
    rate = limits.TenantLimits(10, 0, 0, 0, "day", "high")
    with ThreadPoolExecutor(max_workers=30) as pool:
        answers = list(pool.map(lambda _: attempt(lambda: limits.check_rate("t1", rate)), range(30)))
    assert answers.count("ok") == 10
    assert answers.count("rate_limited") == 20
    # Another tenant has its own window.
    assert attempt(lambda: limits.check_rate("t2", rate)) == "ok"


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_images_quota_is_exact_under_concurrency_and_refunds(darkroom_env: dict[str, Any]) -> None:
    quota = limits.TenantLimits(0, 0, 0, 10, "day", "high")
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda _: attempt(lambda: limits.charge_images("t1", quota, 3)), range(12)))
    assert answers.count("ok") == 3  # 9 of 10 images; a fourth job of 3 would pass the quota
    assert answers.count("images_quota_exceeded") == 9
    assert attempt(lambda: limits.charge_images("t1", quota, 1)) == "ok"  # exactly the 10th image fits
    limits.refund_images("t1", quota, 3)  # a job that was not made after all
    assert attempt(lambda: limits.charge_images("t1", quota, 3)) == "ok"
    assert attempt(lambda: limits.charge_images("t1", quota, 1)) == "images_quota_exceeded"


def test_quota_periods_end_on_calendar_and_epoch_boundaries() -> None:
    late = datetime(2026, 12, 31, 23, 59, 30, tzinfo=UTC)
    assert limits.period_bounds("month", late) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert limits.period_bounds("day", late)[1] == datetime(2027, 1, 1, tzinfo=UTC)
    assert limits.period_bounds("hour", late) == (
        datetime(2026, 12, 31, 23, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    start, end = limits.period_bounds("600", late)
    assert (start.minute, end.minute, end.hour) == (50, 0, 0)
