"""/index: the named indexes, which one /ask reads by default, and compaction."""

from __future__ import annotations

from fastapi import APIRouter, Path

from app.api.deps import AdminDep, FleetDep, ServiceDep, StateDep
from app.api.schemas import INDEX_NAME, CompactOut, IndexList, IndexOut, IndexSelect
from app.errors import NotReadyError
from app.retrieval.interface import CollectionInfo
from app.retrieval.manager import IndexManager

router = APIRouter(prefix="/index", tags=["index"])
NamePath = Path(..., pattern=INDEX_NAME, description="Index name (a folder under the root).")


def get_indexes(state: StateDep, _: ServiceDep) -> IndexManager:
    """The ready service's index manager (503 while loading, like /ask)."""
    if state.indexes is None:
        raise NotReadyError(f"service is {state.status}")
    return state.indexes


def _out(info: CollectionInfo) -> IndexOut:
    return IndexOut(
        name=info.name,
        active=info.active,
        loaded=info.loaded,
        passages=info.passages,
        documents=info.documents,
        type=info.index_type,
        pending_updates=info.pending_updates,
    )


async def _list(indexes: IndexManager) -> IndexList:
    infos = await indexes.list()
    return IndexList(active=indexes.active, indexes=[_out(i) for i in infos])


@router.get("", response_model=IndexList)
async def list_indexes(state: StateDep, service: ServiceDep) -> IndexList:
    """Every index folder under the root; loaded ones with their sizes."""
    return await _list(get_indexes(state, service))


@router.put(
    "",
    response_model=IndexList,
    dependencies=[AdminDep],
    responses={404: {"description": "No such index"}, 422: {"description": "Another encoder's"}},
)
async def select_index(
    body: IndexSelect, state: StateDep, service: ServiceDep, fleet: FleetDep
) -> IndexList:
    """Make `name` the index /ask reads by default, loading it first, on every replica;
    requests already retrieving finish on the index they started with."""
    indexes = get_indexes(state, service)
    await fleet.activate_index(body.name)  # the metrics follow (the store's watch)
    return await _list(indexes)


@router.post("/{name}/compact", response_model=CompactOut, dependencies=[AdminDep])
async def compact_index(state: StateDep, service: ServiceDep, name: str = NamePath) -> CompactOut:
    """Fold the update log into a new snapshot now."""
    done = await get_indexes(state, service).compact(name)
    return CompactOut(index=name, compacted=done)
