"""Tenants and their API keys. A key is shown once at creation; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from shared.db import read_scope
from shared.tables import ApiKey, Tenant, utcnow

KEY_PREFIX = "dr_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(session: Session, tenant_name: str, *, admin: bool = False) -> str:
    """A new key for the tenant (created if new). `admin` makes the tenant an admin; it never demotes one."""
    tenant = get_or_create_tenant(session, tenant_name)
    if admin:
        tenant.is_admin = True
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


# Built once: every request runs it, and building the statement costs more than running it.
_LIVE_KEY = select(ApiKey.tenant_id).where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))


def authenticate(session: Session, key: str) -> str | None:
    """The tenant id owning this live key, or None."""
    return session.scalar(_LIVE_KEY, {"key_hash": hash_key(key)})


# Tenant names never change once created (there is no rename), so each process keeps the few it has
# looked up rather than reading the same row on every submit.
_names: dict[str, str] = {}


def cached_tenant_name(tenant_id: str) -> str | None:
    """The name if this process has looked it up already (no I/O: callable from the event loop)."""
    return _names.get(tenant_id)


def tenant_name(tenant_id: str) -> str:
    name = _names.get(tenant_id)
    if name is None:
        with read_scope() as session:
            name = _names[tenant_id] = session.get_one(Tenant, tenant_id).name
    return name


def is_admin(session: Session, tenant_id: str) -> bool:
    return bool(session.scalar(select(Tenant.is_admin).where(Tenant.id == tenant_id)))


def revoke_key(session: Session, key: str) -> bool:
    stmt = update(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None))
    return session.execute(stmt.values(revoked_at=utcnow())).rowcount == 1  # type: ignore[attr-defined]
