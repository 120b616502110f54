"""/v1/usage: each of the tenant's limits, what it has used, and when that frees up."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from api.deps import SessionDep, UnmeteredTenantDep
from api.errors import responses
from api.schemas import LimitRead, UsageRead
from shared import limits
from shared.tenants import tenant_name

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageRead, responses=responses(401))
def get_usage(session: SessionDep, tenant_id: UnmeteredTenantDep) -> UsageRead:
    """Your limits and what you have used of each; this call itself never counts against them."""
    name = tenant_name(tenant_id)
    tenant_limits = limits.limits_for(name)
    entries = limits.usage(session, tenant_id, tenant_limits)
    return UsageRead(
        tenant=name,
        max_priority=tenant_limits.max_priority,
        limits={e.name: LimitRead.model_validate({k: v for k, v in asdict(e).items() if k != "name"}) for e in entries},
    )
