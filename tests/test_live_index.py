"""Live updates on an index folder: against an exact reference, durable, and safe to share.

The reference is a plain dict of the documents that should be there, searched exactly with
numpy over the same deterministic encoder's vectors.
"""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import pytest

from app.errors import IndexInvalid, InvalidInputError
from app.retrieval import ann
from app.retrieval.chunking import chunk_document
from app.retrieval.live import DocumentNotFound, IndexBusy, IndexWriteError, LiveIndex, folder_lock
from app.retrieval.manifest import LOG_FILE
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, UpdateLimits, prepare, validate
from tests.hash_encoder import HashEncoder

ENC = HashEncoder()
WORDS = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "granite", "harbor", "iris"]


def text(seed: int, n_words: int = 30) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(n_words)) + "."


def new_index(path: Path, kind: str = "flat", **spec: int) -> LiveIndex:
    return LiveIndex.create(
        path, fingerprint=ENC.fingerprint, dim=ENC.dim, spec=ann.AnnSpec(kind=kind, **spec),
        chunk_words=20,
    )  # fmt: skip


def upsert(live: LiveIndex, docs: dict[str, str]) -> None:
    documents = [Document(i, f"title {i}", t, {"n": len(t)}) for i, t in docs.items()]
    live.upsert(prepare(documents, ENC, words=live.index.manifest.chunk_words))


def reference_hits(reference: dict[str, str], queries: list[str], k: int) -> list[list[str]]:
    passages = [
        p for d, t in sorted(reference.items()) for p in chunk_document(d, f"title {d}", t, 20)
    ]
    vectors = ENC.encode_passages(passages)  # [n, dim]
    scores = ENC.encode_questions(queries) @ vectors.T  # [q, n]
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[passages[i].id for i in row] for row in order]


def state(index: PassageIndex) -> dict[str, str]:
    return {d.id: " ".join(p.text for p in d.passages) for d in index.documents()}


def hits(index: PassageIndex, queries: list[str], k: int) -> list[list[str]]:
    return [[h.passage.id for h in row] for row in index.search(ENC.encode_questions(queries), k)]


QUERIES = [text(1000 + i, 6) for i in range(8)]


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_random_updates_equal_the_reference_live_and_after_reload(
    tmp_path: Path, kind: str
) -> None:
    live = new_index(tmp_path / "idx", kind, ef_search=256)
    reference: dict[str, str] = {}
    rng = random.Random(0)
    for step in range(40):
        if reference and rng.random() < 0.3:
            doc_id = rng.choice(sorted(reference))
            live.delete([doc_id])
            del reference[doc_id]
        else:
            batch = {
                f"d{rng.randint(0, 15)}": text(step * 10 + j, rng.randint(5, 60)) for j in range(3)
            }
            upsert(live, batch)
            reference.update(batch)
        assert state(live.index) == {d: " ".join(t.split()) for d, t in reference.items()}
    assert hits(live.index, QUERIES, 5) == reference_hits(reference, QUERIES, 5)
    assert live.index.tombstone_count > 0  # deletes are filtered until compaction
    reloaded = PassageIndex.load(tmp_path / "idx")  # snapshot (empty) + the whole log
    assert state(reloaded) == state(live.index)
    assert hits(reloaded, QUERIES, 5) == hits(live.index, QUERIES, 5)
    assert live.compact() and (tmp_path / "idx" / LOG_FILE).read_bytes() == b""
    assert live.index.tombstone_count == 0 and live.pending_records == 0
    assert live.index._index.ntotal == len(live.index)  # the vectors are gone too
    compacted = PassageIndex.load(tmp_path / "idx")
    assert state(compacted) == state(live.index)
    assert hits(compacted, QUERIES, 5) == reference_hits(reference, QUERIES, 5)
    assert not live.compact()  # nothing left to fold


def test_deleted_text_is_never_returned_even_from_an_hnsw_graph(tmp_path: Path) -> None:
    live = new_index(tmp_path / "idx", "hnsw")
    upsert(live, {f"d{i}": text(i) for i in range(20)})
    secret = text(5)
    live.delete(["d5"])
    found = live.index.search(ENC.encode_questions([secret]), 1000)[0]  # asks for everything
    assert len(found) == len(live.index) and all(h.passage.doc_id != "d5" for h in found)
    assert live.index.document("d5") is None
    assert secret not in (tmp_path / "idx" / "passages.jsonl").read_text()  # not in a snapshot
    live.compact()
    assert secret not in (tmp_path / "idx" / "passages.jsonl").read_text()


def test_replace_keeps_one_copy_and_metadata(tmp_path: Path) -> None:
    live = new_index(tmp_path / "idx")
    upsert(live, {"a": text(1, 50), "b": text(2)})
    first = live.index.document("a")
    upsert(live, {"a": text(3, 10)})
    doc = live.index.document("a")
    assert doc is not None and first is not None
    assert [p.text for p in doc.passages] == [text(3, 10)] and doc.metadata == {
        "n": len(text(3, 10))
    }
    assert set(doc.pids).isdisjoint(first.pids)  # ids are never reused
    assert len(live.index) == len(doc.passages) + len(live.index.document("b").passages)  # type: ignore[union-attr]


def test_unknown_document_delete_names_it_and_changes_nothing(tmp_path: Path) -> None:
    live = new_index(tmp_path / "idx")
    upsert(live, {"a": text(1)})
    with pytest.raises(DocumentNotFound, match=r"'ghost'.*'idx'"):
        live.delete(["a", "ghost"])
    assert state(live.index) == {"a": text(1)} and live.pending_records == 1


def test_validation_names_the_bad_document() -> None:
    limits = UpdateLimits(max_documents=3, max_chars=100)
    ok = Document("a", "", "some text")
    cases = [
        ([ok, Document("a", "", "x")], "document 1 \\('a'\\): id occurs twice"),
        ([ok, Document("b", "", "  ")], "document 1 \\('b'\\): text is empty"),
        ([Document("c", "", "x" * 101)], "'c'.*101 characters, at most 100"),
        ([ok] * 4, "4 documents in one request, at most 3"),
        ([Document("", "", "x")], "document 0: id is empty"),
        ([Document("a\nb", "", "x")], "control character"),
        ([Document("s", "", "half \ud800 pair")], "text holds '\\\\ud800' at 5, not a character"),
        # NUL: refused for both stores alike (PostgreSQL cannot hold it), naming the field
        ([ok, Document("n", "", "a \x00 b")], r"document 1 \('n'\): text holds a NUL .* at 2"),
        ([Document("n", "T\x00", "x")], r"'n'\): title holds a NUL"),
        (
            [Document("n", "", "x", {"tags": ["ok", "b\x00d"]})],
            r"metadata\['tags'\]\[1\] holds a NUL",
        ),
        ([Document("n", "", "x", {"k\x00": 1})], r"'n'\): metadata key holds a NUL"),
    ]
    for documents, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            validate(documents, limits)


def test_torn_last_record_is_dropped_with_a_warning_and_cut_before_the_next_append(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live = new_index(tmp_path / "idx")
    upsert(live, {"a": text(1)})
    log = tmp_path / "idx" / LOG_FILE
    good = log.read_bytes()
    upsert(live, {"b": text(2)})
    whole = log.read_bytes()
    log.write_bytes(whole[: len(good) + (len(whole) - len(good)) // 2])  # killed mid-append
    with caplog.at_level(logging.WARNING):
        reopened = LiveIndex.open(tmp_path / "idx")
    assert state(reopened.index) == {"a": text(1)}
    assert re.search(r"updates\.log:2: dropping a torn last record", caplog.text)
    upsert(reopened, {"c": text(3)})  # cuts the torn bytes first
    assert state(PassageIndex.load(tmp_path / "idx")) == {"a": text(1), "c": text(3)}


def test_corrupt_record_in_the_middle_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    live = new_index(tmp_path / "idx")
    for i in range(3):
        upsert(live, {f"d{i}": text(i)})
    log = tmp_path / "idx" / LOG_FILE
    lines = log.read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b"d1", b"dX", 1)  # checksum no longer matches
    log.write_bytes(b"\n".join(lines))
    with pytest.raises(IndexInvalid, match=re.escape(f"{log}:2: checksum mismatch")):
        PassageIndex.load(tmp_path / "idx")


def test_two_writers_on_one_folder_catch_up_with_each_other(tmp_path: Path) -> None:
    """Two LiveIndex objects stand for the server and the CLI: neither loses the other's work."""
    server = new_index(tmp_path / "idx")
    upsert(server, {"a": text(1)})
    cli = LiveIndex.open(tmp_path / "idx")
    upsert(cli, {"b": text(2)})
    server.refresh()  # what every /ask does first
    assert state(server.index) == {"a": text(1), "b": text(2)}
    cli.compact()  # swaps the folder under the server
    upsert(server, {"c": text(3)})  # reloads the new folder first, then appends to its log
    cli.delete(["a"])  # the CLI catches up with the server's record, then deletes
    expected = {"b": text(2), "c": text(3)}
    assert state(PassageIndex.load(tmp_path / "idx")) == expected
    server.refresh()
    assert state(server.index) == expected


def test_a_writer_waits_for_the_lock_and_then_gives_up_naming_it(tmp_path: Path) -> None:
    live = new_index(tmp_path / "idx")
    with folder_lock(tmp_path / "idx"):  # another open file description: another writer
        busy = pytest.raises(IndexBusy, match=re.escape(str(tmp_path / ".idx.lock")))
        with busy, folder_lock(tmp_path / "idx", wait_s=0.1):
            pass
        before = live.index
        live.refresh()  # a reader never waits for the lock
        assert live.index is before


def test_a_failed_append_is_taken_back_and_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    import app.retrieval.wal as wal

    live = new_index(tmp_path / "idx")
    upsert(live, {"a": text(1)})
    size = (tmp_path / "idx" / LOG_FILE).stat().st_size
    real_write = os.write

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        real_write(fd, bytes(data)[: len(data) // 2])  # half the record reaches the file ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    monkeypatch.setattr(wal.os, "write", half_then_full)
    with pytest.raises(IndexWriteError, match=r"idx: .*No space left on device.*not made"):
        upsert(live, {"b": text(2)})
    monkeypatch.setattr(wal.os, "write", real_write)
    assert (tmp_path / "idx" / LOG_FILE).stat().st_size == size  # the half record is gone
    assert state(live.index) == {"a": text(1)}
    upsert(live, {"c": text(3)})
    assert state(PassageIndex.load(tmp_path / "idx")) == {"a": text(1), "c": text(3)}


@pytest.mark.parametrize("kind", ["ivf_sq", "ivf_pq"])
def test_an_ivf_index_deletes_compacts_and_reloads(tmp_path: Path, kind: str) -> None:
    """IVF kinds keep passage ids in their inverted lists (no IDMap): build, delete, compact
    and reload keep the ids, and a deleted document never comes back."""
    docs = {f"d{i}": text(i, 40) for i in range(140)}  # 280 passages: PQ trains on 256+
    passages = [p for d, t in sorted(docs.items()) for p in chunk_document(d, f"title {d}", t, 20)]
    spec = ann.AnnSpec(kind=kind, nlist=4, nprobe=4, pq_m=4)  # nprobe = nlist: every list
    PassageIndex.build(
        passages, ENC.encode_passages(passages), ENC.fingerprint, spec=spec, chunk_words=20
    ).save(tmp_path / "idx")
    live = LiveIndex.open(tmp_path / "idx")
    assert ann.kind_of(live.index._index) == kind
    gone = [f"d{i}" for i in range(0, 140, 5)]
    live.delete(gone)
    del_text = {docs[d] for d in gone}
    queries = [docs[d][:60] for d in gone[:6]]  # queries that would find the deleted ones

    def returned() -> set[str]:
        found = live.index.search(ENC.encode_questions(queries), 10)
        return {h.passage.doc_id for row in found for h in row}

    assert returned() and not returned() & set(gone)
    assert live.compact()
    assert (
        live.index._index.ntotal
        == len(live.index)
        == len(passages) - sum(1 for p in passages if p.doc_id in gone)
    )
    reloaded = PassageIndex.load(tmp_path / "idx")
    assert state(reloaded) == {d: " ".join(t.split()) for d, t in docs.items() if t not in del_text}
    found = reloaded.search(ENC.encode_questions(queries), 10)
    assert {h.passage.doc_id for row in found for h in row} == returned()


def test_a_graph_rebuild_keeps_deletes_that_land_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HNSW cannot remove a node: a delete that lands while the graph is rebuilt (outside the
    lock) stays a tombstone of the new graph, and its text is still never returned."""
    live = new_index(tmp_path / "idx", "hnsw", ef_search=256)
    docs = {f"d{i}": text(i, 40) for i in range(20)}
    upsert(live, docs)
    live.delete([f"d{i}" for i in range(10)])  # half the graph: past the rebuild fraction
    index = live.index
    real = ann.rebuild_without

    def rebuild_while_a_delete_lands(*args: object, **kwargs: object) -> object:
        rebuilt = real(*args, **kwargs)  # type: ignore[arg-type]
        with index._lock:
            index._drop("d15")
        return rebuilt

    monkeypatch.setattr(ann, "rebuild_without", rebuild_while_a_delete_lands)
    assert index.drop_tombstones()
    assert index.tombstone_count == 2  # d15's two passages, now tombstones of the new graph
    found = index.search(ENC.encode_questions([docs["d15"][:60]]), 10)
    assert "d15" not in {h.passage.doc_id for row in found for h in row}
    assert index._index.ntotal == 20  # d0-d9 gone from the graph: 10 documents x 2 passages
