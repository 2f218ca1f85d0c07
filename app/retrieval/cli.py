"""`lorag index add | delete | compact`: change an index folder from the command line.

They go through the same path as the server's /documents routes (app/retrieval/live.py): the
folder's writer lock, the update log (fsynced before the command reports success), compaction.
So they are safe beside a running server that serves the same folder: each change waits for a
change in flight, and the server picks the CLI's changes up at its next request. `add` creates
the index, empty, if the folder does not exist yet.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from app.retrieval.live import LiveIndex
from app.settings import Settings

log = logging.getLogger(__name__)

BATCH = 64  # documents per log record: a crash loses at most the batch in flight


def _path(args: argparse.Namespace) -> Path:
    return Settings().index_dir / args.index_name


def cmd_add(args: argparse.Namespace) -> int:
    from app.retrieval.ann import spec_from_settings
    from app.retrieval.encoders import load_encoder
    from app.retrieval.sources import read_sources
    from app.retrieval.updates import Document, UpdateLimits, prepare, validate

    settings = Settings()
    encoder = load_encoder(
        settings.encoder,
        settings.encoder_kind,
        device=settings.device,
        context_spec=settings.dpr_context_encoder,
    )
    live = LiveIndex.create(  # refuses another encoder's index, naming both
        _path(args),
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        spec=spec_from_settings(settings),
        chunk_words=args.words,
    )
    documents = [
        Document(d.id, d.title, d.text, d.metadata)
        for d in read_sources([Path(s) for s in args.sources])
    ]
    # the whole input before any batch is written (an id twice across files is refused too)
    validate(documents, UpdateLimits(len(documents) or 1, settings.max_document_chars))
    added = replaced = passages = 0
    words = live.index.manifest.chunk_words
    for start in range(0, len(documents), BATCH):
        batch = documents[start : start + BATCH]
        for outcome in live.upsert(prepare(batch, encoder, words=words)):
            passages += outcome.passages
            replaced += outcome.replaced
            added += not outcome.replaced
    _compact_if_due(live, settings)
    print(
        f"{live.path}: added {added}, replaced {replaced} documents ({passages} passages); "
        f"{len(live.index)} passages in {live.index.document_count} documents"
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    live = LiveIndex.open(_path(args))
    live.delete(args.doc_ids)  # all or none: an unknown id is named and nothing is deleted
    _compact_if_due(live, Settings())
    print(f"{live.path}: deleted {len(args.doc_ids)} documents; {len(live.index)} passages left")
    return 0


def cmd_compact(args: argparse.Namespace) -> int:
    live = LiveIndex.open(_path(args))
    records = live.pending_records
    done = live.compact()
    print(f"{live.path}: " + (f"folded {records} updates" if done else "nothing to compact"))
    return 0


def _compact_if_due(live: LiveIndex, settings: Settings) -> None:
    if live.compaction_due(
        max_bytes=settings.compact_log_bytes, max_records=settings.compact_log_records
    ):
        live.compact()


def add_index_parsers(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    name_help = "index folder name under LORAG_INDEX_DIR"
    s = actions.add_parser(
        "add", help="add or replace documents (.jsonl/.txt/.md files or folders) in an index"
    )
    s.add_argument("sources", nargs="+")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.add_argument(
        "--words", type=int, default=100, help="words per passage, for a new index (else kept)"
    )
    s.set_defaults(func=cmd_add)
    s = actions.add_parser("delete", help="delete documents (all their passages) from an index")
    s.add_argument("doc_ids", nargs="+", metavar="DOC_ID")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.set_defaults(func=cmd_delete)
    s = actions.add_parser("compact", help="fold an index's update log into a new snapshot")
    s.add_argument("--name", dest="index_name", required=True, help=name_help)
    s.set_defaults(func=cmd_compact)
