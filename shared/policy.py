"""The content policy: prompts refused before a job is accepted, and what a safety-checker hit does.

Deny terms and patterns come from settings (every tenant) plus an optional TOML file per tenant name:

    [tenants.acme]
    deny_terms = ["gore"]
    deny_patterns = ["\\bcelebrity\\s+\\w+"]
    nsfw = "flag"          # or "withhold" (the default from DARKROOM_NSFW_ACTION)

A refusal is a 422 with code `content_policy`, and is counted by `record_policy_refusal`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal

from shared.errors import InvalidRequest
from shared.settings import get_settings
from shared.tenant_config import reset_tenant_config, tenant_entry

log = logging.getLogger("darkroom.policy")

NsfwAction = Literal["withhold", "flag"]


class ContentPolicyRefused(InvalidRequest):
    code = "content_policy"


@dataclass(frozen=True)
class TenantPolicy:
    patterns: tuple[re.Pattern[str], ...]
    nsfw: NsfwAction


def _compile(terms: list[str], patterns: list[str]) -> tuple[re.Pattern[str], ...]:
    compiled = [re.compile(rf"(?<!\w){re.escape(t.strip())}(?!\w)", re.I) for t in terms if t.strip()]
    compiled += [re.compile(p, re.I) for p in patterns]
    return tuple(compiled)


def _nsfw(value: Any, where: str) -> NsfwAction:
    if value not in ("withhold", "flag"):
        raise ValueError(f"{where}: nsfw must be 'withhold' or 'flag', got {value!r}")
    return value


def policy_for(tenant_name: str) -> TenantPolicy:
    settings = get_settings()
    entry = tenant_entry(tenant_name)
    return TenantPolicy(
        patterns=_compile(
            [*settings.policy_deny_terms, *entry.get("deny_terms", [])],
            [*settings.policy_deny_patterns, *entry.get("deny_patterns", [])],
        ),
        nsfw=_nsfw(entry.get("nsfw", settings.nsfw_action), f"tenant {tenant_name!r}"),
    )


def check_prompt(policy: TenantPolicy, tenant_name: str, fields: dict[str, str | None]) -> None:
    """Refuse (422 `content_policy`) if any text field matches a deny term or pattern."""
    for field, text in fields.items():
        if not text:
            continue
        for pattern in policy.patterns:
            if pattern.search(text):
                record_policy_refusal(tenant_name)
                # The message names the field, not the pattern: deny lists are not for the client to probe.
                raise ContentPolicyRefused(f"{field}: refused by the content policy")


try:
    from prometheus_client import Counter

    _REFUSALS: Any = Counter(
        "darkroom_policy_refusals_total", "Jobs refused by the content policy, by tenant.", ["tenant"]
    )
except ImportError:  # prometheus_client is optional; the log line below still counts
    _REFUSALS = None


def record_policy_refusal(tenant: str) -> None:
    log.info("content policy refusal for tenant %s", tenant)
    if _REFUSALS is not None:
        _REFUSALS.labels(tenant=tenant).inc()


def reset_policy_cache() -> None:
    reset_tenant_config()
