"""Named indexes: the folders under index_dir, loaded on first use, one of them the default.

The RAG paper swaps the whole index to change what the model knows, without retraining. Here
several indexes built with the same encoder can be loaded side by side; `/ask` reads the active
one unless it names another, and `activate` switches the default in one assignment. A request
resolves its index object once, at the start of its retrieval, so a switch never splits one
request across two indexes; requests already retrieving finish on the index they started with.

Loading is lazy and happens once per name however many callers ask at the same time (a lock per
name); it reads files and replays the log, so callers run it off the event loop. An index built
with another encoder is refused with both fingerprints named (IndexInvalid, HTTP 422).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from app.contracts import NAME_RE
from app.errors import IndexNotFound, InvalidInputError
from app.retrieval.ann import AnnSpec
from app.retrieval.atomic import displaced
from app.retrieval.live import LiveIndex
from app.retrieval.manifest import MANIFEST_FILE
from app.retrieval.store import PassageIndex

logger = logging.getLogger(__name__)

_NAME = NAME_RE


@dataclass(frozen=True)
class IndexInfo:
    name: str
    active: bool
    loaded: bool
    passages: int | None = None  # None while not loaded
    documents: int | None = None
    kind: str | None = None
    pending_updates: int | None = None  # log records not yet compacted into the snapshot


class IndexObserver(Protocol):
    """Told an index's size after it loads or changes (the metrics gauges)."""

    def __call__(self, name: str, passages: int, pending: int, *, active: bool) -> None: ...


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInputError(
            f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class IndexCatalog:
    def __init__(
        self,
        root: Path,
        active: str,
        *,
        fingerprint: str,
        search: AnnSpec | None = None,
        on_change: IndexObserver | None = None,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self._search = search
        self._active = check_name(active)
        self._loaded: dict[str, LiveIndex] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # guards the two dicts
        self.on_change = on_change

    @property
    def active(self) -> str:
        return self._active

    def get(self, name: str | None = None) -> LiveIndex:
        """The named index (the active one for None), loading it on first use."""
        name = check_name(name) if name is not None else self._active
        with self._guard:
            live = self._loaded.get(name)
            if live is not None:
                return live
            name_lock = self._loading.setdefault(name, threading.Lock())
        with name_lock:  # one load per name; later callers find it loaded
            with self._guard:
                live = self._loaded.get(name)
            if live is None:
                live = self._load(name)
                with self._guard:
                    self._loaded[name] = live
                self.changed(live)
        return live

    def resolve(self, name: str | None = None) -> PassageIndex:
        """The in-memory index a request should search, resolved once for the request, after
        catching up with changes another process (the CLI) made to its folder."""
        live = self.get(name)
        before, seq = live.index, live.index.last_seq
        live.refresh()
        if live.index is not before or live.index.last_seq != seq:
            self.changed(live)
        return live.index

    def _load(self, name: str) -> LiveIndex:
        path = self.root / name
        if not path.exists() and not displaced(path):
            known = ", ".join(self.names()) or "none"
            raise IndexNotFound(f"no index {name!r} under {self.root} (there are: {known})")
        return LiveIndex.open(path, expect_fingerprint=self.fingerprint, search=self._search)

    def activate(self, name: str) -> LiveIndex:
        """Load `name` if needed, then make it the default; one assignment, so atomic."""
        live = self.get(name)
        previous, self._active = self._active, name
        if previous != name:
            logger.info("active index: %s -> %s", previous, name)
        self.changed(live)
        return live

    def loaded(self) -> dict[str, LiveIndex]:
        with self._guard:
            return dict(self._loaded)

    def names(self) -> list[str]:
        """Index folders under the root (hidden and non-index folders skipped)."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if _NAME.match(p.name) and (p / MANIFEST_FILE).is_file()
        )

    def list(self) -> list[IndexInfo]:
        loaded = self.loaded()
        infos = []
        for name in sorted(set(self.names()) | loaded.keys()):
            live = loaded.get(name)
            if live is None:
                infos.append(IndexInfo(name, name == self._active, False))
                continue
            index = live.index
            infos.append(
                IndexInfo(
                    name,
                    name == self._active,
                    True,
                    len(index),
                    index.document_count,
                    index.manifest.index_type,
                    live.pending_records,
                )
            )
        return infos

    def watch(self, observer: IndexObserver) -> None:
        """Report every change to `observer`, starting with the indexes loaded now."""
        self.on_change = observer
        for live in self.loaded().values():
            self.changed(live)

    def changed(self, live: LiveIndex) -> None:
        if self.on_change is not None:
            index = live.index
            active = live.name == self._active
            self.on_change(live.name, len(index), live.pending_records, active=active)

    def close(self, *, compact: bool = True) -> None:
        """Fold pending log records into snapshots (shutdown); errors are logged, not raised:
        the log already holds every acknowledged change."""
        if not compact:
            return
        for live in self.loaded().values():
            if live.pending_records:
                try:
                    live.compact()
                except Exception:
                    logger.exception("compacting %s at shutdown failed; its log is kept", live.path)
