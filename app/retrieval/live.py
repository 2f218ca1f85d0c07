"""A writable index folder: live adds and deletes, made durable by the update log, and compaction.

Every change follows one path, whoever makes it (the server's /documents routes, or the CLI's
`lorag index add/delete/compact` on a folder):

    take the writer lock      a threading.Lock (one writer per index in a process) and an flock
                              on `<index_dir>/.<name>.lock` (one writer per index across processes)
    catch up                  if another process wrote since we loaded (the folder was swapped by
                              a compaction or build, or its log grew), reload or replay first
    append + fsync the record to updates.log: from here on the change is acknowledged
    apply                     FAISS and docstore in memory, under the index's read lock

The flock is taken per change, not held while a server runs: a CLI write to an index a server
has loaded then just waits for a change in flight, and the server catches up before its own
next change (not before its next read: until then its /ask does not see the CLI's change; the
API is the way to change an index a server serves). Readers never take the flock.

Compaction writes a snapshot of the in-memory index (which already holds every logged change)
with an empty log, and swaps it in with PassageIndex.save's atomic rename; it runs when the log
passes a size or record count, on shutdown, and on demand. A kill -9 at any point leaves either
the old folder with its full log or the new folder: both hold the same acknowledged state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from app.contracts import Hit
from app.errors import (
    IndexInvalid,
    IndexNotFound,
    LoragError,
    NotReadyError,
)
from app.retrieval import wal
from app.retrieval.ann import AnnSpec
from app.retrieval.atomic import displaced, recover_replace, remove_stale_temp
from app.retrieval.docstore import StoredDocument
from app.retrieval.filters import MetadataFilter
from app.retrieval.interface import CollectionInfo, DocumentNotFound, SearchMode, Upserted
from app.retrieval.manifest import LOG_FILE
from app.retrieval.store import Origin, PassageIndex
from app.retrieval.updates import Prepared

logger = logging.getLogger(__name__)

LOCK_WAIT_S = 30.0  # how long a writer waits for another process's change to finish


class IndexBusy(NotReadyError):
    """Another process holds the index's writer lock for longer than we wait."""


class IndexWriteError(LoragError):
    """The folder could not be written (disk full, read-only, permissions): nothing changed."""


class Owner(Protocol):
    """The store a LiveIndex belongs to (IndexCatalog): told of its changes, knows which
    collection is active."""

    def changed(self, live: LiveIndex) -> None: ...

    def is_active(self, name: str) -> bool: ...


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def folder_lock(path: Path, *, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """The cross-process writer lock of the index folder `path` (released if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = lock_path(path)
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexBusy(
                        f"index {path} is being written by another process (lock {target} held "
                        f"for over {wait_s:.0f} s); try again when it is done"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing releases the flock


class LiveIndex:
    """The FAISS store's Collection (app/retrieval/interface.py): one index folder, searched in
    memory, changed through its log; it also `Compacts`."""

    def __init__(
        self,
        path: Path,
        index: PassageIndex,
        *,
        search: AnnSpec | None = None,
        owner: Owner | None = None,
    ) -> None:
        self.path = path
        self.name = path.name
        self._index = index
        self._search = search
        self._fingerprint = index.manifest.encoder
        self._lock = threading.Lock()
        self.owner = owner  # set by the IndexCatalog that loads it

    @classmethod
    def open(
        cls, path: Path, *, expect_fingerprint: str | None = None, search: AnnSpec | None = None
    ) -> LiveIndex:
        path = Path(path)
        if not path.exists() and displaced(path):
            with folder_lock(path):
                recover_replace(path)
        index = PassageIndex.load(path, expect_fingerprint=expect_fingerprint, search=search)
        return cls(path, index, search=search)

    @classmethod
    def create(
        cls, path: Path, *, fingerprint: str, dim: int, spec: AnnSpec, chunk_words: int = 100
    ) -> LiveIndex:
        """Open the index at `path`, first creating it empty if there is none."""
        path = Path(path)
        with folder_lock(path):
            recover_replace(path)
            if not path.exists():
                empty = np.zeros((0, dim), dtype=np.float32)  # [0, dim]
                PassageIndex.build([], empty, fingerprint, spec=spec, chunk_words=chunk_words).save(
                    path
                )
                logger.info("created an empty index at %s", path)
        return cls.open(path, expect_fingerprint=fingerprint)

    @property
    def index(self) -> PassageIndex:
        """The current in-memory index; resolve it once per request (a reload replaces it)."""
        return self._index

    # the Collection interface ---------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray | None,  # [n, dim] float32; dense and hybrid
        k: int,
        where: MetadataFilter | None = None,
        *,
        mode: SearchMode = "dense",
        texts: Sequence[str] | None = None,  # the questions; sparse and hybrid
    ) -> list[list[Hit]]:
        """Top-k per query row, after catching up with another process's changes (the CLI's);
        dense, sparse (BM25) or hybrid (PassageIndex.search)."""
        self.refresh()
        return self._index.search(queries, k, where, mode=mode, texts=texts)

    def document(self, doc_id: str) -> StoredDocument | None:
        return self._index.document(doc_id)

    def count(self) -> tuple[int, int]:
        index = self._index
        return len(index), index.document_count

    def describe(self) -> CollectionInfo:
        index = self._index
        manifest = index.manifest
        return CollectionInfo(
            name=self.name,
            kind="faiss",
            encoder=manifest.encoder,
            dim=manifest.dim,
            passages=len(index),
            documents=index.document_count,
            index_type=manifest.index_type,
            active=self.owner is not None and self.owner.is_active(self.name),
            chunk_words=manifest.chunk_words,
            pending_updates=self.pending_records,
        )

    def _changed(self) -> None:
        if self.owner is not None:
            self.owner.changed(self)

    # FAISS-only: the log and its compaction ------------------------------------------------

    @property
    def pending_records(self) -> int:
        """Log records since the last snapshot."""
        return self._index.last_seq - self._index.manifest.last_seq

    @property
    def log_bytes(self) -> int:
        return self._origin().log_end

    def compaction_due(self, *, max_bytes: int, max_records: int) -> bool:
        return self.log_bytes >= max_bytes or self.pending_records >= max_records

    def refresh(self) -> None:
        """Catch up with another process's changes, if there are any and no writer is busy.

        Two stat calls when nothing changed, so it runs before every search; when another writer
        holds the lock it returns at once, and the next request tries again."""
        origin = self._index.origin
        if origin is None:
            return
        try:
            st = os.stat(self.path)
            log_size = os.stat(self.path / LOG_FILE).st_size
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino, log_size) == (origin.device, origin.inode, origin.log_end):
            return
        if not self._lock.acquire(blocking=False):  # our own change is being written
            return
        before, seq = self._index, self._index.last_seq
        try:
            with folder_lock(self.path, wait_s=0):
                self._catch_up()
        except IndexBusy:
            pass
        finally:
            self._lock.release()
        if self._index is not before or self._index.last_seq != seq:
            self._changed()

    # changes ------------------------------------------------------------------------------

    def upsert(self, prepared: Prepared) -> list[Upserted]:
        """Add or replace each prepared document (all or none), durably."""
        if prepared.fingerprint != self._fingerprint:
            raise IndexInvalid(
                f"vectors from encoder {prepared.fingerprint!r}, but index {self.name!r} was "
                f"built with {self._fingerprint!r}"
            )
        with self._writing():
            index = self._index
            documents, pid = [], index.next_id
            outcome = []
            for doc, passages in prepared.documents:
                pids = tuple(range(pid, pid + len(passages)))
                pid += len(passages)
                documents.append(
                    StoredDocument(doc.id, doc.title, tuple(passages), pids, dict(doc.metadata))
                )
                replaced = index.document(doc.id) is not None
                outcome.append(Upserted(doc.id, len(passages), replaced))
            record = wal.Upsert(index.last_seq + 1, tuple(documents), prepared.vectors)
            self._commit(record)
        self._changed()
        return outcome

    def delete(self, doc_ids: Sequence[str]) -> None:
        """Delete whole documents, durably; an unknown id refuses the lot (DocumentNotFound)."""
        with self._writing():
            index = self._index
            for doc_id in doc_ids:
                if index.document(doc_id) is None:
                    raise DocumentNotFound(doc_id, self.name)
            self._commit(wal.Delete(index.last_seq + 1, tuple(doc_ids)))
        self._changed()

    def compact(self) -> bool:
        """Fold the log into a new snapshot (and drop tombstones if there are many); False if
        there was nothing to fold."""
        with self._writing():
            remove_stale_temp(self.path)
            rebuilt = self._index.drop_tombstones()
            if not rebuilt and self.pending_records == 0:
                return False
            started = time.perf_counter()
            records = self.pending_records
            self._index.save(self.path)
        self._changed()
        logger.info(
            "compacted %s: %d log records folded into a snapshot of %d passages in %.2f s",
            self.path,
            records,
            len(self._index),
            time.perf_counter() - started,
        )
        return True

    def _commit(self, record: wal.Record) -> None:
        origin = self._origin()
        writer = wal.LogWriter(self.path / LOG_FILE, origin.log_end)
        try:
            writer.append(record)  # fsynced: acknowledged once this returns
        finally:
            writer.close()
        self._index.apply(record)
        self._index.origin = dataclasses.replace(origin, log_end=writer.end)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            with self._lock, folder_lock(self.path):
                self._catch_up()
                yield
        except OSError as exc:  # an append is taken back, a snapshot is not swapped in
            raise IndexWriteError(
                f"cannot write index {self.path}: {exc}; the change was not made"
            ) from exc

    def _origin(self) -> Origin:
        origin = self._index.origin
        if origin is None:
            raise IndexInvalid(f"index {self.path} was not loaded from its folder")
        return origin

    def _catch_up(self) -> None:
        """Bring the in-memory index up to what is on disk (another process may have written)."""
        recover_replace(self.path)
        try:
            st = os.stat(self.path)
        except FileNotFoundError as exc:
            raise IndexNotFound(f"index folder {self.path} is gone") from exc
        origin = self._origin()
        if (st.st_dev, st.st_ino) != (origin.device, origin.inode):
            logger.info("%s was replaced by another process: reloading it", self.path)
            self._index = PassageIndex.load(
                self.path, expect_fingerprint=self._fingerprint, search=self._search
            )
            return
        log = self.path / LOG_FILE
        if os.stat(log).st_size == origin.log_end:
            return
        index = self._index
        tail = wal.read(log, dim=index.dim, after_seq=index.manifest.last_seq)
        fresh = [r for r in tail.records if r.seq > index.last_seq]
        for record in fresh:
            index.apply(record)
        index.origin = dataclasses.replace(origin, log_end=tail.end)
        if fresh:
            logger.info("%s: applied %d changes another process made", self.path, len(fresh))
