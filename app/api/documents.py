"""/documents: add or replace documents in an index, read one back, delete one; live."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.api.deps import AdminDep, ServiceDep, StateDep
from app.api.index import get_indexes
from app.api.schemas import INDEX_NAME, DocumentOut, DocumentResult, DocumentsIn, DocumentsOut
from app.retrieval.interface import DocumentNotFound
from app.retrieval.updates import Document

router = APIRouter(prefix="/documents", tags=["documents"])
IndexQuery = Annotated[
    str | None,
    Query(pattern=INDEX_NAME, description="Target index; default: the active one (GET /index)."),
]


@router.post(
    "",
    response_model=DocumentsOut,
    dependencies=[AdminDep],
    responses={422: {"description": "A bad document, named; nothing was changed"}},
)
async def upsert_documents(
    body: DocumentsIn, state: StateDep, service: ServiceDep, index: IndexQuery = None
) -> DocumentsOut:
    """Add each document, or replace the one with its id: chunk, embed, log (fsync), apply.
    All or none; visible to the next /ask once this returns."""
    indexes = get_indexes(state, service)
    name = index or indexes.active  # once: a concurrent PUT /index cannot split this
    documents = [Document(d.id, d.title, d.text, dict(d.metadata)) for d in body.documents]
    done = await indexes.upsert(documents, name)
    return DocumentsOut(
        index=name,
        documents=[
            DocumentResult(id=u.doc_id, passages=u.passages, replaced=u.replaced) for u in done
        ],
    )


@router.get("/{doc_id:path}", response_model=DocumentOut)
async def get_document(
    doc_id: str, state: StateDep, service: ServiceDep, index: IndexQuery = None
) -> DocumentOut:
    indexes = get_indexes(state, service)
    name = index or indexes.active
    document = await indexes.document(doc_id, name)
    if document is None:
        raise DocumentNotFound(doc_id, name)
    return DocumentOut(
        id=document.id,
        index=name,
        title=document.title,
        metadata=dict(document.metadata),
        passages=[p.text for p in document.passages],
    )


@router.delete(
    "/{doc_id:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[AdminDep],
    responses={404: {"description": "No such document in the index"}},
)
async def delete_document(
    doc_id: str, state: StateDep, service: ServiceDep, index: IndexQuery = None
) -> Response:
    """Delete the document and all its passages, durably; its text is never returned again."""
    indexes = get_indexes(state, service)
    await indexes.delete(doc_id, index or indexes.active)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
