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
from pathlib import Path

from app.contracts import NAME_RE
from app.errors import IndexNotFound, InvalidInputError, LoragError
from app.retrieval.ann import AnnSpec
from app.retrieval.atomic import displaced
from app.retrieval.interface import CollectionInfo, IndexObserver, StoreKind
from app.retrieval.live import LiveIndex
from app.retrieval.manifest import MANIFEST_FILE, IndexManifest

logger = logging.getLogger(__name__)

_NAME = NAME_RE


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidInputError(
            f"index name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


class IndexCatalog:
    """The FAISS store's PassageStore (app/retrieval/interface.py): the index folders under
    `root`, each a LiveIndex once loaded; it is also `Watched` (the metrics gauges)."""

    kind: StoreKind = "faiss"

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
                live = self._add(self._load(name))
        return live

    def create(self, name: str, *, dim: int, chunk_words: int = 100) -> LiveIndex:
        """The named index, created empty (of this catalog's ANN kind) if there is none."""
        name = check_name(name)
        with self._guard:
            name_lock = self._loading.setdefault(name, threading.Lock())
        with name_lock:
            with self._guard:
                live = self._loaded.get(name)
            if live is None:
                live = self._add(
                    LiveIndex.create(
                        self.root / name,
                        fingerprint=self.fingerprint,
                        dim=dim,
                        spec=self._search or AnnSpec(),
                        chunk_words=chunk_words,
                    )
                )
        return live

    def _add(self, live: LiveIndex) -> LiveIndex:
        with self._guard:
            live = self._loaded.setdefault(live.name, live)
        live.owner = self
        self.changed(live)
        return live

    def is_active(self, name: str) -> bool:
        return name == self._active

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

    def list(self) -> list[CollectionInfo]:
        """Every index folder; one not loaded yet is described from its manifest, its sizes
        None (loading it would read all its files)."""
        loaded = self.loaded()
        infos = []
        for name in sorted(set(self.names()) | loaded.keys()):
            live = loaded.get(name)
            infos.append(live.describe() if live is not None else self._unloaded(name))
        return infos

    def _unloaded(self, name: str) -> CollectionInfo:
        folder = self.root / name
        try:
            manifest = IndexManifest.parse((folder / MANIFEST_FILE).read_bytes(), folder)
        except (OSError, LoragError) as exc:  # a load says why in full; a listing goes on
            logger.warning("cannot read the manifest of %s: %s", folder, exc)
            manifest = None
        return CollectionInfo(
            name=name,
            kind=self.kind,
            encoder=manifest.encoder if manifest else "",
            dim=manifest.dim if manifest else 0,
            passages=None,
            documents=None,
            index_type=manifest.index_type if manifest else "unreadable",
            active=name == self._active,
            chunk_words=manifest.chunk_words if manifest else 0,
            loaded=False,
        )

    def watch(self, observer: IndexObserver) -> None:
        """Report every change to `observer`, starting with the indexes loaded now."""
        self.on_change = observer
        for live in self.loaded().values():
            self.changed(live)

    def refresh(self) -> None:
        """The loaded indexes' sizes again (only this process changes them: nothing new)."""
        for live in self.loaded().values():
            self.changed(live)

    def changed(self, live: LiveIndex) -> None:
        if self.on_change is not None:
            index = live.index
            active = live.name == self._active
            self.on_change(live.name, len(index), live.pending_records, active=active)

    def close(self) -> None:
        """Nothing to release: every acknowledged change is in its folder's log already (the
        server's shutdown compacts through IndexManager.close)."""
