"""`lorag index add | delete | compact`: change an index folder from the command line.

They go through the same path as the server's /documents routes (app/retrieval/live.py): the
folder's writer lock, the update log (fsynced before the command reports success), compaction.
So they are safe beside a running server that serves the same folder: each change waits for a
change in flight, and the server picks the CLI's changes up at its next request. `add` creates
the index, empty, if the folder does not exist yet.

The commands take an `IndexCommandConfig`, which app/cli.py builds from the settings when a
command runs; nothing here reads the settings itself.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.retrieval.ann import AnnSpec
from app.retrieval.config import EncoderSpec
from app.retrieval.live import LiveIndex
from app.retrieval.manager import CompactionPolicy

log = logging.getLogger(__name__)

BATCH = 64  # documents per log record: a crash loses at most the batch in flight


@dataclass(frozen=True)
class IndexCommandConfig:
    index_dir: Path  # the commands' --name is a folder under it
    encoder: EncoderSpec  # embeds added documents (and must be the one the index was built with)
    search: AnnSpec  # the kind of a new index
    max_document_chars: int  # as POST /documents refuses
    compaction: CompactionPolicy  # compact after a change once the log passes it

    def __post_init__(self) -> None:
        if self.max_document_chars < 1:
            raise ValueError(
                f"max_document_chars must be at least 1, got {self.max_document_chars}"
            )


Command = Callable[[argparse.Namespace, IndexCommandConfig], int]


def _path(args: argparse.Namespace, config: IndexCommandConfig) -> Path:
    return config.index_dir / args.index_name


def cmd_add(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    from app.retrieval.sources import read_sources
    from app.retrieval.updates import Document, UpdateLimits, prepare, validate

    encoder = config.encoder.load()
    live = LiveIndex.create(  # refuses another encoder's index, naming both
        _path(args, config),
        fingerprint=encoder.fingerprint,
        dim=encoder.dim,
        spec=config.search,
        chunk_words=args.words,
    )
    documents = [
        Document(d.id, d.title, d.text, d.metadata)
        for d in read_sources([Path(s) for s in args.sources])
    ]
    # the whole input before any batch is written (an id twice across files is refused too)
    validate(documents, UpdateLimits(len(documents) or 1, config.max_document_chars))
    added = replaced = passages = 0
    words = live.index.manifest.chunk_words
    for start in range(0, len(documents), BATCH):
        batch = documents[start : start + BATCH]
        for outcome in live.upsert(prepare(batch, encoder, words=words)):
            passages += outcome.passages
            replaced += outcome.replaced
            added += not outcome.replaced
    _compact_if_due(live, config.compaction)
    print(
        f"{live.path}: added {added}, replaced {replaced} documents ({passages} passages); "
        f"{len(live.index)} passages in {live.index.document_count} documents"
    )
    return 0


def cmd_delete(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    live = LiveIndex.open(_path(args, config))
    live.delete(args.doc_ids)  # all or none: an unknown id is named and nothing is deleted
    _compact_if_due(live, config.compaction)
    print(f"{live.path}: deleted {len(args.doc_ids)} documents; {len(live.index)} passages left")
    return 0


def cmd_compact(args: argparse.Namespace, config: IndexCommandConfig) -> int:
    live = LiveIndex.open(_path(args, config))
    records = live.pending_records
    done = live.compact()
    print(f"{live.path}: " + (f"folded {records} updates" if done else "nothing to compact"))
    return 0


def _compact_if_due(live: LiveIndex, policy: CompactionPolicy) -> None:
    if live.compaction_due(max_bytes=policy.max_log_bytes, max_records=policy.max_log_records):
        live.compact()


def _bound(cmd: Command, config: Callable[[], IndexCommandConfig]) -> Callable[..., int]:
    """cmd as an argparse `func(args)`, its config made when it runs (not at parse time)."""
    return lambda args: cmd(args, config())


def add_index_parsers(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    config: Callable[[], IndexCommandConfig],
) -> None:
    name_help = "index folder name under LORAG_INDEX_DIR"
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
