"""The passage index: a FAISS index keyed by int64 passage ids, its docstore, and its update log.

An index folder is a snapshot (the FAISS index, the docstore, a manifest that checksums them:
app/retrieval/manifest.py) and an update log that grows after it (app/retrieval/wal.py). `load`
reads the snapshot and replays the log on top, so a loaded index holds exactly what was
acknowledged.

Passages live in FAISS under stable int64 ids, never reused, so a passage keeps its id when
others are added or deleted. A delete drops the docstore entry at once (so a deleted passage's
text cannot be returned) and makes its ids tombstones, excluded inside every search (ann.search's
IDSelector). Removing vectors from a flat index right away would cost a pass over all of them
per delete (33 ms at 100k passages, bench/RESULTS.md), and an HNSW graph cannot drop a node at
all; so compaction removes the tombstones from flat and IVF indexes in one batched pass, and
rebuilds an HNSW graph once they are a tenth of it. Tombstones need no file: they are the ids
FAISS holds that the docstore does not.

Readers never see half an update: `apply` changes FAISS and the docstore under one lock, which
`search` takes too (a flat search over a few hundred thousand vectors is milliseconds; a
snapshot copies both under it, and writes the copy outside it).

Saving is atomic (app/retrieval/atomic.py): the files are written and fsynced in a temporary
folder beside the target, which is then swapped into place in one step, so a reader sees the
old index or the new one, never a mix; as the log is inside the folder, a snapshot and the
truncation of the log are that same one step. Loading pins the folder with a directory file
descriptor for the same reason, and verifies each file's sha256 against the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.contracts import Hit, Passage, SearchMode
from app.errors import IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval import ann, atomic, wal
from app.retrieval.ann import AnnSpec
from app.retrieval.docstore import DocStore, StoredDocument, group_by_document
from app.retrieval.filters import MetadataFilter
from app.retrieval.fusion import DEFAULT_FUSION, Fusion, search_by_mode
from app.retrieval.manifest import (
    DATA_FILES,
    DOCUMENTS_FILE,
    INDEX_FILE,
    LOG_FILE,
    MANIFEST_FILE,
    PASSAGES_FILE,
    IndexManifest,
)
from app.retrieval.sparse import SparseIndex

logger = logging.getLogger(__name__)

REBUILD_FRACTION = 0.1  # compaction rebuilds an index whose tombstones reach this share


@dataclass(frozen=True)
class Origin:
    """Which folder generation and how much of its log an in-memory index reflects."""

    device: int
    inode: int
    log_end: int  # bytes of updates.log applied


class PassageIndex:
    """Passages and their vectors; search returns the top-k passages by inner product."""

    def __init__(
        self, manifest: IndexManifest, index: faiss.Index, docs: DocStore, spec: AnnSpec
    ) -> None:
        if index.d != manifest.dim:
            raise IndexInvalid(f"FAISS index is {index.d}-d, the manifest says {manifest.dim}-d")
        ids = _faiss_ids(index)  # [ntotal] int64
        missing = set(docs.pids()) - set(ids.tolist())
        if missing:
            raise IndexInvalid(
                f"FAISS index holds {index.ntotal} vectors but lacks passage ids "
                f"{sorted(missing)[:5]} of the docstore"
            )
        self.manifest = manifest
        self.spec = spec
        self.next_id = max(manifest.next_id, int(ids.max()) + 1 if len(ids) else 0)
        self.last_seq = manifest.last_seq
        self.origin: Origin | None = None  # set by load
        self._index = index
        self._docs = docs
        self._tombstones = set(ids.tolist()) - set(docs.pids())
        self._excluded: np.ndarray | None = None  # sorted tombstones, made at the next search
        # BM25 over the docstore's passages, following every apply (app/retrieval/sparse.py)
        self._sparse = SparseIndex([(pid, p) for pid in docs.pids() if (p := docs.passage(pid))])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._docs)

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def passages(self) -> Sequence[Passage]:
        """Every passage, in id order."""
        with self._lock:
            return tuple(self._docs.passages_in_id_order())

    @property
    def document_count(self) -> int:
        return self._docs.document_count

    @property
    def tombstone_count(self) -> int:
        return len(self._tombstones)

    @property
    def kind(self) -> str:
        return ann.kind_of(self._index)

    def document(self, doc_id: str) -> StoredDocument | None:
        with self._lock:
            return self._docs.document(doc_id)

    def documents(self) -> list[StoredDocument]:
        with self._lock:
            return self._docs.documents()

    def vectors(self, pids: Sequence[int]) -> np.ndarray:
        """The stored vectors of these passage ids, [len(pids), dim] float32 (`lorag index
        copy`); flat and HNSW indexes keep them exactly, IVF ones keep no id -> vector map."""
        outer = faiss.downcast_index(self._index)
        if not isinstance(outer, faiss.IndexIDMap2):
            raise InvalidInputError(
                f"a {self.kind} index keeps no vector per passage id: its vectors cannot be "
                "copied (embed the sources again: lorag index build)"
            )
        with self._lock:
            rows = [outer.reconstruct(int(pid)) for pid in pids]
        return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)

    def search(
        self,
        queries: np.ndarray | None,
        k: int,
        where: MetadataFilter | None = None,
        *,
        mode: SearchMode = "dense",
        texts: Sequence[str] | None = None,
        fusion: Fusion = DEFAULT_FUSION,
    ) -> list[list[Hit]]:
        """Top-k hits per query, best first; k is capped at the number of passages (that
        match `where`: only passages of documents whose metadata matches it come back, and k
        of them when k match, the filter being applied inside the search).

        dense: by inner product with the `queries` vectors [n, dim]; sparse: by BM25 of the
        questions' `texts` (n of them), only passages sharing a term with the question (the
        score is BM25's); hybrid: both lists, `fusion.depth_for(k)` deep, fused by reciprocal
        rank (app/retrieval/fusion.py; the score is the RRF score)."""
        return search_by_mode(
            queries,
            k,
            mode,
            texts,
            dense=lambda q, n: self._dense_search(q, n, where),
            sparse=lambda t, n: self._sparse_search(t, n, where),
            fusion=fusion,
        )

    def _sparse_search(
        self, texts: Sequence[str], k: int, where: MetadataFilter | None
    ) -> list[list[Hit]]:
        with self._lock:
            allowed = None if where is None else self._matching_pids(where)  # [m] int64
        # outside the store's lock: a stale BM25 index is rebuilt there (app/retrieval/sparse.py)
        ranked = self._sparse.search(texts, k, allowed)
        with self._lock:  # a passage deleted since is gone from the docstore: never returned
            passage, document = self._docs.passage, self._docs.document
            return [
                [
                    Hit(p, score, _metadata(document(p.doc_id)))
                    for pid, score in row
                    if (p := passage(pid)) is not None
                ]
                for row in ranked
            ]

    def _dense_search(
        self, queries: np.ndarray, k: int, where: MetadataFilter | None
    ) -> list[list[Hit]]:
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(
                f"queries must have shape [n, {self.dim}], got {list(queries.shape)}"
            )
        with self._lock:
            allowed = None if where is None else self._matching_pids(where)  # [m] int64
            k = min(k, len(self) if allowed is None else len(allowed))
            if k == 0:
                return [[] for _ in range(queries.shape[0])]
            if self._excluded is None:  # deletes since the last search (a replay makes many)
                self._excluded = np.array(sorted(self._tombstones), dtype=np.int64)
            # [n, k] each; id -1 marks "no result"; tombstones are excluded inside the search
            scores, ids = ann.search(
                self._index, queries, k, self.spec, self._excluded, include=allowed
            )
            if allowed is not None and (ids < 0).any():
                # a graph walk can miss a selective filter's few passages: search those exactly
                exact = ann.exact_among(self._index, queries, k, allowed)
                if exact is not None:
                    scores, ids = exact
            passage, document = self._docs.passage, self._docs.document
            return [
                [
                    Hit(p, float(s), _metadata(document(p.doc_id)))
                    for s, i in zip(row_scores, row_ids, strict=True)
                    if i >= 0 and (p := passage(int(i))) is not None
                ]
                for row_scores, row_ids in zip(scores, ids, strict=True)
            ]

    def _matching_pids(self, where: MetadataFilter) -> np.ndarray:
        pids = [pid for d in self._docs.documents() if where.matches(d.metadata) for pid in d.pids]
        return np.array(sorted(pids), dtype=np.int64)

    # changes ------------------------------------------------------------------------------

    def apply(self, record: wal.Record) -> None:
        """Apply one update-log record: FAISS and docstore change together, under the lock."""
        if record.seq != self.last_seq + 1:
            raise IndexInvalid(f"update {record.seq} does not follow {self.last_seq}")
        with self._lock:
            if isinstance(record, wal.Upsert):
                self._apply_upsert(record)
            else:
                for doc_id in record.doc_ids:
                    self._drop(doc_id)
            self.last_seq = record.seq

    def _apply_upsert(self, record: wal.Upsert) -> None:
        pids = np.array([pid for d in record.documents for pid in d.pids], dtype=np.int64)
        if record.vectors.shape != (len(pids), self.dim):
            raise InvalidInputError(
                f"vectors must have shape [{len(pids)}, {self.dim}], "
                f"got {list(record.vectors.shape)}"
            )
        if len(pids) and int(pids.min()) < self.next_id:
            raise InvalidInputError(f"passage ids must start at {self.next_id}, got {pids.min()}")
        for document in record.documents:
            self._drop(document.id)
        if len(pids):
            self._index.add_with_ids(np.ascontiguousarray(record.vectors, np.float32), pids)
            self.next_id = int(pids.max()) + 1
        for document in record.documents:
            self._docs.put(document)
            for pid, passage in zip(document.pids, document.passages, strict=True):
                self._sparse.add(pid, passage)

    def _drop(self, doc_id: str) -> None:
        pids = self._docs.remove(doc_id)
        if pids:
            self._sparse.remove(pids)
            self._tombstones.update(pids)
            self._excluded = None

    def drop_tombstones(self, *, at_least: float = REBUILD_FRACTION) -> bool:
        """Take the tombstoned vectors out of FAISS (compaction): flat and IVF in one batched
        removal; HNSW by a rebuild, once the tombstones are `at_least` of the graph."""
        with self._lock:
            if not self._tombstones:
                return False
            drop = np.array(sorted(self._tombstones), dtype=np.int64)
            if ann.supports_remove(self._index):  # one pass over the vectors, under the lock
                self._index.remove_ids(faiss.IDSelectorBatch(drop))
                self._tombstones, self._excluded = set(), None
                return True
            if len(drop) < at_least * self._index.ntotal:
                return False
            next_id = self.next_id
        # outside the lock, so searches go on meanwhile (a graph rebuild is slow); callers keep
        # writers out (LiveIndex.compact holds its writer lock), and if one got in anyway its
        # passages are not in `rebuilt`, which is then thrown away
        rebuilt = ann.rebuild_without(self._index, self.spec, drop)
        with self._lock:
            if self.next_id != next_id:
                logger.warning("passages were added during the rebuild; kept the old index")
                return False
            # deletes that came meanwhile stay tombstones, now of the rebuilt index (a graph
            # cannot remove a node)
            fresh = self._tombstones - set(drop.tolist())
            self._index, self._tombstones, self._excluded = rebuilt, fresh, None
        logger.info("rebuilt the index without %d deleted passages", len(drop))
        return True

    @classmethod
    def build(
        cls,
        passages: Sequence[Passage],
        vectors: np.ndarray,
        fingerprint: str,
        *,
        spec: AnnSpec | None = None,
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
        chunk_words: int = 100,
    ) -> PassageIndex:
        """An index over `vectors` [n, dim], row i for passages[i], which gets id i;
        `metadata` by document id; `chunk_words` is recorded for later updates."""
        if vectors.ndim != 2 or vectors.shape[0] != len(passages):
            raise InvalidInputError(
                f"vectors must have shape [{len(passages)}, dim], got {list(vectors.shape)}"
            )
        if not np.isfinite(vectors).all():
            row = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise InvalidInputError(f"vector of passage {passages[row].id!r} is not finite")
        seen: set[str] = set()
        for passage in passages:
            if passage.id in seen:
                raise InvalidInputError(f"passage id {passage.id!r} occurs twice")
            seen.add(passage.id)
        spec = spec or AnnSpec()
        dim = int(vectors.shape[1])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # [n, dim]
        index = ann.new_index(dim, spec, vectors)
        if len(passages):
            index.add_with_ids(vectors, np.arange(len(passages), dtype=np.int64))
        docs = DocStore()
        for document in group_by_document(passages):
            extra = (metadata or {}).get(document.id)
            docs.put(dataclasses.replace(document, metadata=dict(extra)) if extra else document)
        manifest = IndexManifest(
            fingerprint,
            dim,
            len(passages),
            docs.document_count,
            index_type=ann.describe(index),
            ann=dataclasses.asdict(spec),
            next_id=len(passages),
            chunk_words=chunk_words,
        )
        return cls(manifest, index, docs, spec)

    # files --------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write a snapshot to `path` atomically, replacing the index there and its log."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InvalidInputError(f"{path} exists and is not an index folder")
        self.manifest = atomic.replace_folder(path, self._write_files)
        st = os.stat(path)
        self.origin = Origin(st.st_dev, st.st_ino, 0)
        logger.info("saved index of %d passages to %s", len(self), path)

    def _write_files(self, folder: Path) -> IndexManifest:
        with self._lock:  # a consistent copy; the slow writes happen outside the lock
            blobs = {INDEX_FILE: faiss.serialize_index(self._index).tobytes()}
            blobs[PASSAGES_FILE], blobs[DOCUMENTS_FILE] = self._docs.to_jsonl()
            manifest = dataclasses.replace(
                self.manifest,
                passage_count=len(self._docs),
                document_count=self._docs.document_count,
                index_type=ann.describe(self._index),
                ann=dataclasses.asdict(self.spec),
                next_id=self.next_id,
                last_seq=self.last_seq,
            )
        for name, blob in [*blobs.items(), (LOG_FILE, b"")]:
            atomic.write_synced(folder / name, blob)
        manifest = manifest.with_checksums(blobs)
        atomic.write_synced(folder / MANIFEST_FILE, manifest.encode())
        return manifest

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        expect_fingerprint: str | None = None,
        search: AnnSpec | None = None,
    ) -> PassageIndex:
        """Read and verify a snapshot and replay its log; with expect_fingerprint, refuse
        another encoder's index; `search` overrides the manifest's search parameters."""
        path = Path(path)
        try:
            dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise IndexNotFound(
                f"no index at {path} (build one with `lorag index build SOURCE... --name NAME`)"
            ) from exc
        try:
            st = os.fstat(dir_fd)
            raw = _read(path, MANIFEST_FILE, dir_fd)
            manifest = IndexManifest.parse(raw, path / MANIFEST_FILE)
            manifest.check_encoder(expect_fingerprint, path)
            blobs = {name: _read(path, name, dir_fd) for name in (*DATA_FILES, LOG_FILE)}
        finally:
            os.close(dir_fd)
        manifest.verify(blobs, path)
        try:
            index = faiss.deserialize_index(np.frombuffer(blobs[INDEX_FILE], dtype=np.uint8))
            ann.kind_of(index)
        except (RuntimeError, InvalidInputError) as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: not a FAISS index ({exc})") from exc
        docs = DocStore.from_jsonl(
            blobs[PASSAGES_FILE], blobs[DOCUMENTS_FILE], path / PASSAGES_FILE, path / DOCUMENTS_FILE
        )
        if len(docs) != manifest.passage_count:
            raise IndexInvalid(
                f"{path / PASSAGES_FILE}: {len(docs)} passages, "
                f"{MANIFEST_FILE} says {manifest.passage_count}"
            )
        spec = manifest.spec(path / MANIFEST_FILE)
        if search is not None:
            spec = dataclasses.replace(spec, ef_search=search.ef_search, nprobe=search.nprobe)
        try:
            loaded = cls(manifest, index, docs, spec)
        except IndexInvalid as exc:
            raise IndexInvalid(f"{path / INDEX_FILE}: {exc}") from exc
        tail = wal.parse(
            blobs[LOG_FILE], path / LOG_FILE, dim=manifest.dim, after_seq=manifest.last_seq
        )
        for record in tail.records:
            loaded.apply(record)
        loaded.origin = Origin(st.st_dev, st.st_ino, tail.end)
        logger.info(
            "loaded index %s: %d passages, %s, %d updates replayed",
            path,
            len(loaded),
            manifest.index_type,
            len(tail.records),
        )
        return loaded


def _metadata(document: StoredDocument | None) -> Mapping[str, Any]:
    return document.metadata if document is not None else {}


def _faiss_ids(index: faiss.Index) -> np.ndarray:
    # flat and HNSW keep ids in an IndexIDMap2; IVF kinds store them in their inverted lists
    # (an IDMap over IVF would scramble ids after remove_ids: app/retrieval/ann.py)
    try:
        return ann.ids_of(index)  # [ntotal]
    except (AttributeError, RuntimeError) as exc:
        raise IndexInvalid(f"a FAISS index without passage ids ({exc})") from exc


def _read(path: Path, name: str, dir_fd: int) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError as exc:
        raise IndexInvalid(f"{path / name}: missing") from exc
    with os.fdopen(fd, "rb") as handle:
        return handle.read()
