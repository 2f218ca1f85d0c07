"""Typed dependencies: the app state, the ready service, the admin guard."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from app.errors import NotReadyError
from app.service import RagService
from app.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.lorag
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_service(state: StateDep) -> RagService:
    if state.service is None or state.status != "ready":
        raise NotReadyError(
            f"service is {state.status}" + (f": {state.error}" if state.error else "")
        )
    return state.service


ServiceDep = Annotated[RagService, Depends(get_service)]


def require_admin(request: Request, state: StateDep) -> None:
    """Bearer-token guard for mutating routes; open when no admin token is configured."""
    token = state.settings.admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # constant-time comparison, so response timing does not leak the token
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin token required: send 'Authorization: Bearer <LORAG_ADMIN_TOKEN>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)
