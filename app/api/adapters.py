"""/adapters: list, load or replace, unload, at runtime."""

from __future__ import annotations

from fastapi import APIRouter, Path, Response, status

from app.api.deps import AdminDep, ServiceDep, StateDep, get_fleet
from app.api.schemas import (
    ADAPTER_NAME,
    AdapterList,
    AdapterLoad,
    AdapterOut,
    QuestionEncoderOut,
    TaskOut,
)
from app.lora.registry import AdapterInfo
from app.lora.tasks import TaskView
from app.service import RagService
from app.state import AppState

router = APIRouter(prefix="/adapters", tags=["adapters"])
NamePath = Path(..., pattern=ADAPTER_NAME, description="Adapter name.")


def _task(view: TaskView | None) -> TaskOut | None:
    if view is None:
        return None
    q = view.question
    return TaskOut(
        mode=view.manifest.mode,
        top_k=view.manifest.top_k,
        question_encoder=None
        if q is None
        else QuestionEncoderOut(
            path=q.path,
            version=q.version,
            rank=q.rank,
            target_modules=list(q.target_modules),
            bytes=q.bytes,
        ),
    )


def _out(info: AdapterInfo, task: TaskView | None = None) -> AdapterOut:
    return AdapterOut(
        name=info.name,
        path=info.path,
        version=info.version,
        rank=info.rank,
        alpha=info.alpha,
        target_modules=list(info.target_modules),
        base_model=info.base_model,
        bytes=info.bytes,
        resident_bytes=info.resident_bytes,
        loaded_at=info.loaded_at,
        pinned=info.pinned,
        last_used=info.last_used,
        requests_served=info.requests_served,
        task=_task(task),
    )


def _record_resident(state: AppState, service: RagService) -> None:
    state.metrics.observe_registry(service.registry)


async def load(
    service: RagService, state: AppState, name: str, path: str, *, pinned: bool
) -> tuple[AdapterInfo, bool]:
    """Load (or replace) an adapter, counted in the metrics: PUT /adapters/{name} and vLLM's
    POST /v1/load_lora_adapter. Returns its info and whether it replaced one. It is registered
    in the fleet's ledger first, so every replica loads the same version (app/fleet)."""
    fleet = get_fleet(state, service)
    try:
        info, replaced = await fleet.load_adapter(name, path, pinned=pinned)
    except Exception:
        state.metrics.adapter_ops.labels("load", "error").inc()
        raise
    state.metrics.adapter_ops.labels("replace" if replaced else "load", "ok").inc()
    _record_resident(state, service)
    return info, replaced


async def unload(service: RagService, state: AppState, name: str) -> None:
    """DELETE /adapters/{name} and POST /v1/unload_lora_adapter: on every replica."""
    await get_fleet(state, service).unload_adapter(name)
    state.metrics.adapter_ops.labels("unload", "ok").inc()
    _record_resident(state, service)


@router.get("", response_model=AdapterList)
async def list_adapters(service: ServiceDep, state: StateDep) -> AdapterList:
    _record_resident(state, service)  # lazy loads in /ask may have loaded or evicted some
    return AdapterList(
        adapters=[_out(i, service.tasks.view(i.name)) for i in service.registry.list()]
    )


@router.get("/{name}", response_model=AdapterOut)
async def get_adapter(service: ServiceDep, name: str = NamePath) -> AdapterOut:
    return _out(service.registry.get(name), service.tasks.view(name))


@router.put(
    "/{name}",
    response_model=AdapterOut,
    dependencies=[AdminDep],
    responses={
        201: {"model": AdapterOut, "description": "Loaded under a new name"},
        422: {"description": "Invalid adapter, or it cannot fit the adapter memory budget"},
    },
)
async def put_adapter(
    body: AdapterLoad,
    response: Response,
    service: ServiceDep,
    state: StateDep,
    name: str = NamePath,
) -> AdapterOut:
    """Load an adapter folder (relative to the adapters root) under `name`; replace it if loaded.

    Over the adapter memory budget, least recently used unpinned idle adapters are evicted;
    if that cannot make room, 422 names the budget and the sizes and nothing is evicted."""
    info, replaced = await load(service, state, name, body.path, pinned=body.pinned)
    response.status_code = status.HTTP_200_OK if replaced else status.HTTP_201_CREATED
    return _out(info, service.tasks.view(name))


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[AdminDep],
    response_class=Response,
)
async def delete_adapter(service: ServiceDep, state: StateDep, name: str = NamePath) -> Response:
    await unload(service, state, name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
