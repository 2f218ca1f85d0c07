"""Typed dependencies: the app state, the ready service, the admin guard."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from pydantic import SecretStr

from app.errors import NotReadyError
from app.fleet.fleet import Fleet
from app.service import RagService
from app.state import AppState


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.lorag
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_service(state: StateDep) -> RagService:
    if state.service is None or state.status not in ("ready", "draining"):
        raise NotReadyError(
            f"service is {state.status}" + (f": {state.error}" if state.error else "")
        )
    return state.service


ServiceDep = Annotated[RagService, Depends(get_service)]


def get_fleet(state: StateDep, _: ServiceDep) -> Fleet:
    """Where adapter and active-index changes go (the ledger first, then this replica)."""
    if state.fleet is None:
        raise NotReadyError(f"service is {state.status}")
    return state.fleet


FleetDep = Annotated[Fleet, Depends(get_fleet)]


def _check_bearer(request: Request, token: SecretStr | None, setting: str) -> None:
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # constant-time comparison, so response timing does not leak the token
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"token required: send 'Authorization: Bearer <{setting}>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_admin(request: Request, state: StateDep) -> None:
    """Guard for every mutating route; open when LORAG_ADMIN_TOKEN is unset."""
    _check_bearer(request, state.settings.admin_token, "LORAG_ADMIN_TOKEN")


def require_api(request: Request, state: StateDep) -> None:
    """Guard for /ask; open when LORAG_API_TOKEN is unset."""
    _check_bearer(request, state.settings.api_token, "LORAG_API_TOKEN")


AdminDep = Depends(require_admin)
ApiDep = Depends(require_api)
