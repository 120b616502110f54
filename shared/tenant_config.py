"""Per-tenant settings from the operator's TOML file (DARKROOM_TENANT_POLICY_FILE), one table per tenant name:

    [tenants.acme]
    deny_terms = ["gore"]      # content policy (shared.policy)
    nsfw = "flag"
    max_running = 4            # limits and priority (shared.limits)

A tenant without a table gets the global settings. The file is read once per process; restart to reload.
"""

from __future__ import annotations

import tomllib
from functools import lru_cache
from typing import Any

from shared.settings import get_settings


@lru_cache
def _tenant_table() -> dict[str, dict[str, Any]]:
    path = get_settings().tenant_policy_file
    if path is None:
        return {}
    return dict(tomllib.loads(path.read_text()).get("tenants", {}))


def tenant_entry(tenant_name: str) -> dict[str, Any]:
    """The tenant's table from the file, empty if it has none."""
    return dict(_tenant_table().get(tenant_name, {}))


def tenant_names() -> list[str]:
    """Every tenant the file has a table for."""
    return sorted(_tenant_table())


def reset_tenant_config() -> None:
    _tenant_table.cache_clear()
