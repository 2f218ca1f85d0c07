"""The docstore: passage id (int64, the FAISS id) -> Passage, and document id -> its passage ids.

FAISS knows vectors by int64 id only; everything a reader sees (text, titles, document ids) lives
here. Ids are handed out from a counter that only grows (`next_id`) and are never reused, so an id
that FAISS still holds after its passage was deleted (HNSW cannot remove a vector, see
app/retrieval/ann.py) can never be taken for a newer passage.

Two files in the index folder hold it, both JSON lines in id / document order:

    passages.jsonl    {"pid": 17, "id": "doc#0", "doc_id": "doc", "title": "...", "text": "..."}
    documents.jsonl   {"id": "doc", "title": "...", "metadata": {...}, "pids": [17, 18]}

The class is a plain container, not thread-safe: PassageIndex guards it with its lock.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.contracts import Passage
from app.errors import IndexInvalid, InvalidInputError


@dataclass(frozen=True)
class StoredDocument:
    """One document as the index holds it: its passages in order, each with its int64 id."""

    id: str
    title: str
    passages: tuple[Passage, ...]
    pids: tuple[int, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.passages) != len(self.pids):
            raise InvalidInputError(
                f"document {self.id!r}: {len(self.passages)} passages but {len(self.pids)} ids"
            )
        if not self.passages:
            raise InvalidInputError(f"document {self.id!r} has no passages")
        for p in self.passages:
            if p.doc_id != self.id:
                raise InvalidInputError(
                    f"passage {p.id!r} belongs to {p.doc_id!r}, not {self.id!r}"
                )


class DocStore:
    def __init__(self) -> None:
        self._passages: dict[int, Passage] = {}
        self._documents: dict[str, StoredDocument] = {}

    def __len__(self) -> int:
        """Number of passages."""
        return len(self._passages)

    @property
    def document_count(self) -> int:
        return len(self._documents)

    def passage(self, pid: int) -> Passage | None:
        return self._passages.get(pid)

    def document(self, doc_id: str) -> StoredDocument | None:
        return self._documents.get(doc_id)

    def documents(self) -> list[StoredDocument]:
        return list(self._documents.values())

    def pids(self) -> list[int]:
        return sorted(self._passages)

    def passages_in_id_order(self) -> list[Passage]:
        return [self._passages[pid] for pid in sorted(self._passages)]

    def put(self, document: StoredDocument) -> None:
        """Add a document; one with the same id must have been removed first."""
        if document.id in self._documents:
            raise InvalidInputError(f"document {document.id!r} is already stored")
        if taken := [pid for pid in document.pids if pid in self._passages]:
            raise InvalidInputError(f"passage ids {taken[:5]} of {document.id!r} are taken")
        self._documents[document.id] = document
        self._passages.update(zip(document.pids, document.passages, strict=True))

    def remove(self, doc_id: str) -> tuple[int, ...]:
        """Drop a document and its passages; their ids (empty if the document is unknown)."""
        document = self._documents.pop(doc_id, None)
        if document is None:
            return ()
        for pid in document.pids:
            del self._passages[pid]
        return document.pids

    # files --------------------------------------------------------------------------------

    def to_jsonl(self) -> tuple[bytes, bytes]:
        """(passages.jsonl, documents.jsonl) contents."""
        passages = "".join(
            json.dumps(
                {"pid": pid, "id": p.id, "doc_id": p.doc_id, "title": p.title, "text": p.text},
                ensure_ascii=False,
            )
            + "\n"
            for pid, p in sorted(self._passages.items())
        )
        documents = "".join(
            json.dumps(
                {"id": d.id, "title": d.title, "metadata": dict(d.metadata), "pids": list(d.pids)},
                ensure_ascii=False,
            )
            + "\n"
            for d in self._documents.values()
        )
        return passages.encode(), documents.encode()

    @classmethod
    def from_jsonl(
        cls, passages_blob: bytes, documents_blob: bytes, passages_src: Path, documents_src: Path
    ) -> DocStore:
        by_pid: dict[int, Passage] = {}
        for line_no, record in _records(passages_blob, passages_src):
            try:
                pid = record["pid"]
                passage = Passage(record["id"], record["doc_id"], record["title"], record["text"])
            except (KeyError, TypeError) as exc:
                raise IndexInvalid(
                    f"{passages_src}:{line_no}: not a passage record ({exc})"
                ) from exc
            if not isinstance(pid, int) or pid in by_pid:
                raise IndexInvalid(f"{passages_src}:{line_no}: bad or repeated pid {pid!r}")
            by_pid[pid] = passage
        store = cls()
        for line_no, record in _records(documents_blob, documents_src):
            try:
                pids = tuple(record["pids"])
                document = StoredDocument(
                    id=record["id"],
                    title=record["title"],
                    passages=tuple(by_pid.pop(pid) for pid in pids),
                    pids=pids,
                    metadata=record.get("metadata") or {},
                )
                store.put(document)
            except (KeyError, TypeError, InvalidInputError) as exc:
                message = (
                    f"{documents_src}:{line_no}: not a document of {passages_src.name} ({exc})"
                )
                raise IndexInvalid(message) from exc
        if by_pid:
            orphan = min(by_pid)
            raise IndexInvalid(f"{passages_src}: passage pid {orphan} belongs to no document")
        return store


def _records(blob: bytes, source: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    for line_no, line in enumerate(blob.splitlines(), start=1):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise IndexInvalid(f"{source}:{line_no}: not JSON ({exc})") from exc
        if not isinstance(record, dict):
            raise IndexInvalid(f"{source}:{line_no}: expected a JSON object")
        yield line_no, record


def group_by_document(passages: Sequence[Passage], first_pid: int = 0) -> list[StoredDocument]:
    """Documents of `passages` (grouped by doc_id, in first-seen order), with ids from first_pid
    in the order of `passages`; a document's title is its first passage's."""
    grouped: dict[str, list[tuple[int, Passage]]] = {}
    for offset, passage in enumerate(passages):
        grouped.setdefault(passage.doc_id, []).append((first_pid + offset, passage))
    return [
        StoredDocument(
            id=doc_id,
            title=rows[0][1].title,
            passages=tuple(p for _, p in rows),
            pids=tuple(pid for pid, _ in rows),
        )
        for doc_id, rows in grouped.items()
    ]
