"""Request dependencies: the database session (one unit of work) and the authenticated tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.errors import Unauthorized
from shared.tenants import authenticate


def get_session() -> Iterator[Session]:
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_tenant(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized(
            "missing API key: send `Authorization: Bearer <key>`", headers={"WWW-Authenticate": "Bearer"}
        )
    with session_scope() as session:
        tenant_id = authenticate(session, key.strip())
    if tenant_id is None:
        raise Unauthorized("invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant_id


TenantDep = Annotated[str, Depends(get_tenant)]
