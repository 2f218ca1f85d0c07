"""`lorag index add | delete | compact | copy`: change an index from the command line.

They go through the passage store interface (app/retrieval/interface.py), the same one the
server's /documents routes use. With the FAISS store that is the folder's writer lock, the
update log (fsynced before the command reports success) and compaction
(app/retrieval/live.py), so they are safe beside a running server that serves the same folder:
each change waits for a change in flight, and the server picks the CLI's changes up at its next
request. `add` creates the index, empty, if it does not exist yet. `compact` folds a log where
the store keeps one (`Compacts`); elsewhere there is nothing to fold. `copy` puts a FAISS
folder's documents into the configured store (Postgres) with the folder's vectors
(app/retrieval/index_copy.py).

The commands take an `IndexCommandConfig`, which app/cli.py builds from the settings when a
command runs; nothing here reads the settings itself.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from app.retrieval.config import EncoderSpec
from app.retrieval.interface import Collection, Compacts, PassageStore
from app.retrieval.manager import CompactionPolicy

log = logging.getLogger(__name__)

BATCH = 64  # documents per log record: a crash loses at most the batch in flight

# the store for an encoder fingerprint, closed on exit (app.wiring.opened_store)
StoreOpener = Callable[[str], AbstractContextManager[PassageStore]]


@dataclass(frozen=True)
class IndexCommandConfig:
    store: StoreOpener  # opens the configured store (LORAG_STORE); --name is one of its indexes
    encoder: EncoderSpec  # embeds added documents (and must be the one the index was built with)
    max_document_chars: int  # as POST /documents refuses
    compaction: CompactionPolicy  # compact after a change once the log passes it

    def __post_init__(self) -> None:
        if self.max_document_chars < 1:
            raise ValueError(
                f"max_document_chars must be at least 1, got {self.max_document_chars}"
            )


Command = Callable[[argparse.Namespace, IndexCommandConfig], int]


def _sizes(collection: Collection) -> str:
    passages, documents = collection.count()
    return f"{passages} passages in {documents} documents"


def cmd_add(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    from app.retrieval.sources import read_sources
    from app.retrieval.updates import Document, UpdateLimits, prepare, validate

    encoder = config.encoder.load()
    with config.store(encoder.fingerprint) as store:
        # refuses another encoder's index, naming both; a new one is chunked at --words
        collection = store.create(args.index_name, dim=encoder.dim, chunk_words=args.words)
        documents = [
            Document(d.id, d.title, d.text, d.metadata)
            for d in read_sources([Path(s) for s in args.sources])
        ]
        # the whole input before any batch is written (an id twice across files is refused too)
        validate(documents, UpdateLimits(len(documents) or 1, config.max_document_chars))
        added = replaced = passages = 0
        words = collection.describe().chunk_words
        for start in range(0, len(documents), BATCH):
            batch = documents[start : start + BATCH]
            for outcome in collection.upsert(prepare(batch, encoder, words=words)):
                passages += outcome.passages
                replaced += outcome.replaced
                added += not outcome.replaced
        _compact_if_due(collection, config.compaction)
        print(
            f"index {collection.name!r}: added {added}, replaced {replaced} documents "
            f"({passages} passages); {_sizes(collection)}"
        )
    return 0


def _fingerprint(config: IndexCommandConfig) -> str:
    """The configured encoder's, for a command that embeds nothing: an index of another
    encoder is refused by name, as for the server."""
    return config.encoder.load().fingerprint


def cmd_delete(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    with config.store(_fingerprint(config)) as store:
        collection = store.get(args.index_name)
        collection.delete(args.doc_ids)  # all or none: an unknown id is named, nothing deleted
        _compact_if_due(collection, config.compaction)
        done = f"deleted {len(args.doc_ids)} documents"
        print(f"index {collection.name!r}: {done}; {_sizes(collection)}")
    return 0


def cmd_compact(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    with config.store(_fingerprint(config)) as store:
        collection = store.get(args.index_name)
        records = collection.describe().pending_updates or 0
        done = isinstance(collection, Compacts) and collection.compact()
        outcome = f"folded {records} updates" if done else "nothing to compact"
        print(f"index {collection.name!r}: {outcome}")
    return 0


def cmd_copy(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    """A FAISS index folder into the configured store (LORAG_STORE), its vectors as they are:
    nothing is embedded, so no encoder is loaded; the store checks the folder's encoder."""
    from app.retrieval.index_copy import copy_index
    from app.retrieval.store import PassageIndex

    source = PassageIndex.load(Path(args.folder))
    name = args.index_name or Path(args.folder).name
    with config.store(source.manifest.encoder) as store:
        target = store.create(name, dim=source.dim, chunk_words=source.manifest.chunk_words)
        documents, passages = copy_index(source, target)
        info = target.describe()
        print(
            f"copied {args.folder} into {info.kind} index {name!r}: {documents} documents "
            f"({passages} passages); {_sizes(target)}"
        )
    return 0


def _compact_if_due(collection: Collection, policy: CompactionPolicy) -> None:
    if isinstance(collection, Compacts) and collection.compaction_due(
        max_bytes=policy.max_log_bytes, max_records=policy.max_log_records
    ):
        collection.compact()


def _bound(cmd: Command, config: Callable[[], IndexCommandConfig]) -> Callable[..., int]:
    """cmd as an argparse `func(args)`, its config made when it runs (not at parse time)."""
    return lambda args: cmd(args, config())


def add_index_parsers(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    config: Callable[[], IndexCommandConfig],
) -> None:
    name_help = "index name (a folder under LORAG_INDEX_DIR with the FAISS store)"
    s = actions.add_parser(
        "add", help="add or replace documents (.jsonl/.txt/.md files or folders) in an index"
    )
    s.add_argument("sources", nargs="+")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.add_argument(
        "--words", type=int, default=100, help="words per passage, for a new index (else kept)"
    )
    s.set_defaults(func=_bound(cmd_add, config))
    s = actions.add_parser("delete", help="delete documents (all their passages) from an index")
    s.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.set_defaults(func=_bound(cmd_delete, config))
    s = actions.add_parser("compact", help="fold an index's update log into a new snapshot")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.set_defaults(func=_bound(cmd_compact, config))
    s = actions.add_parser(
        "copy",
        help="copy a FAISS index folder into the configured store (LORAG_STORE), vectors as-is",
    )
    s.add_argument("folder", help="the FAISS index folder to copy from")
    s.add_argument("--name", dest="index_name", help="target index name (default: the folder's)")
    s.set_defaults(func=_bound(cmd_copy, config))
