"""PassageIndex: exact search against numpy, persistence, verification and atomic replacement."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

import app.retrieval.atomic as atomic
from app.contracts import Passage
from app.errors import IndexInvalid, IndexNotFound, InvalidInputError
from app.retrieval.manifest import FORMAT_VERSION, IndexOutdated, sha256
from app.retrieval.store import PassageIndex

DIM = 16


def make_index(n: int = 300, *, seed: int = 0, fingerprint: str = "enc-a") -> PassageIndex:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)  # [n, DIM]
    passages = [
        Passage(f"doc{i // 3}#{i % 3}", f"doc{i // 3}", f"T{i}", f"text {i}") for i in range(n)
    ]
    return PassageIndex.build(passages, vectors, fingerprint)


def numpy_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: exact inner products, sorted descending."""
    scores = queries @ vectors.T  # [q, n]
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def vectors_of(index: PassageIndex) -> np.ndarray:
    return np.stack([index._index.reconstruct(i) for i in range(len(index))])  # [n, DIM], by id


@pytest.mark.parametrize("k", [1, 7, 50])
def test_search_equals_exact_numpy_top_k(k: int) -> None:
    index = make_index()
    queries = np.random.default_rng(1).normal(size=(20, DIM)).astype(np.float32)
    ref_ids, ref_scores = numpy_top_k(vectors_of(index), queries, k)
    hits = index.search(queries, k)
    row_of = {p.id: i for i, p in enumerate(index.passages)}
    assert [[row_of[h.passage.id] for h in row] for row in hits] == ref_ids.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], ref_scores, rtol=1e-5)


def test_k_is_capped_at_the_number_of_passages_and_hits_are_sorted() -> None:
    index = make_index(n=5)
    (hits,) = index.search(np.ones((1, DIM), dtype=np.float32), 100)
    assert len(hits) == 5
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_bad_queries_and_k_are_refused_naming_the_value() -> None:
    index = make_index(n=5)
    with pytest.raises(InvalidInputError, match="got 0"):
        index.search(np.ones((1, DIM), dtype=np.float32), 0)
    with pytest.raises(InvalidInputError, match=r"\[1, 3\]"):
        index.search(np.ones((1, 3), dtype=np.float32), 1)


def test_build_refuses_duplicate_ids_wrong_shapes_and_nan() -> None:
    p = [Passage("a#0", "a", "", "x"), Passage("a#0", "a", "", "y")]
    with pytest.raises(InvalidInputError, match="'a#0' occurs twice"):
        PassageIndex.build(p, np.zeros((2, 4), dtype=np.float32), "f")
    with pytest.raises(InvalidInputError, match=r"\[1, 4\]"):
        PassageIndex.build(p[:1] * 2, np.zeros((1, 4), dtype=np.float32), "f")
    bad = np.zeros((1, 4), dtype=np.float32)
    bad[0, 2] = np.nan
    with pytest.raises(InvalidInputError, match="'a#0' is not finite"):
        PassageIndex.build(p[:1], bad, "f")


def test_round_trip_keeps_passages_manifest_and_results(tmp_path: Path) -> None:
    index = make_index()
    index.save(tmp_path / "idx")
    assert sorted(f.name for f in (tmp_path / "idx").iterdir()) == [
        "documents.jsonl",
        "index.faiss",
        "manifest.json",
        "passages.jsonl",
        "updates.log",
    ]
    assert (tmp_path / "idx" / "updates.log").read_bytes() == b""
    loaded = PassageIndex.load(tmp_path / "idx", expect_fingerprint="enc-a")
    assert list(loaded.passages) == list(index.passages)
    m = loaded.manifest
    assert (m.encoder, m.dim, m.passage_count, m.document_count) == ("enc-a", DIM, 300, 100)
    assert (m.index_type, m.ann["kind"], m.next_id, m.last_seq) == (
        "IDMap2,Flat IP",
        "auto",
        300,
        0,
    )
    assert m.format_version == FORMAT_VERSION and m.created.endswith("+00:00")
    assert set(m.checksums) == {"index.faiss", "passages.jsonl", "documents.jsonl"}
    assert [d.pids for d in loaded.documents()] == [d.pids for d in index.documents()]
    queries = np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32)
    assert loaded.search(queries, 10) == index.search(queries, 10)
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text()) == m.to_json()


def test_missing_index_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFound, match=re.escape(str(tmp_path / "absent"))):
        PassageIndex.load(tmp_path / "absent")


def test_other_encoder_is_refused_naming_both(tmp_path: Path) -> None:
    make_index(n=10).save(tmp_path / "idx")
    with pytest.raises(IndexInvalid) as err:
        PassageIndex.load(tmp_path / "idx", expect_fingerprint="enc-b")
    assert "'enc-a'" in str(err.value) and "'enc-b'" in str(err.value)


@pytest.mark.parametrize(
    "name", ["index.faiss", "passages.jsonl", "documents.jsonl", "manifest.json", "updates.log"]
)
def test_corrupt_or_missing_file_is_named(tmp_path: Path, name: str) -> None:
    make_index(n=10).save(tmp_path / "idx")
    target = tmp_path / "idx" / name
    blob = bytearray(target.read_bytes() or b"0badc0de {}\n")  # the log is empty: corrupt it
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob) + (b"0badc0de {}\n" if name == "updates.log" else b""))
    with pytest.raises(IndexInvalid, match=re.escape(str(target))):
        PassageIndex.load(tmp_path / "idx")
    target.unlink()
    with pytest.raises(IndexInvalid, match=re.escape(f"{target}: missing")):
        PassageIndex.load(tmp_path / "idx")


def test_unreadable_faiss_file_with_a_matching_checksum_is_named(tmp_path: Path) -> None:
    """Past the checksum, FAISS itself must reject garbage with the file named."""
    make_index(n=10).save(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"not a faiss index")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["checksums"]["index.faiss"] = sha256(b"not a faiss index")
    manifest_path.write_text(json.dumps(manifest))
    expected = re.escape(f"{tmp_path / 'idx' / 'index.faiss'}: not a FAISS")
    with pytest.raises(IndexInvalid, match=expected):
        PassageIndex.load(tmp_path / "idx")


def test_passage_count_disagreeing_with_manifest_is_named(tmp_path: Path) -> None:
    make_index(n=10).save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["passage_count"] = 11
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexInvalid, match=r"passages\.jsonl: 10 passages, manifest\.json says 11"):
        PassageIndex.load(tmp_path / "idx")


def test_format_1_folder_is_refused_as_outdated(tmp_path: Path) -> None:
    make_index(n=10).save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexOutdated, match=r"version 1, this lorag reads 2.*index build"):
        PassageIndex.load(tmp_path / "idx")


def test_future_format_version_is_refused(tmp_path: Path) -> None:
    make_index(n=10).save(tmp_path / "idx")
    manifest_path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 99
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexInvalid, match="version 99"):
        PassageIndex.load(tmp_path / "idx")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_replaces_an_existing_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    make_index(n=10, fingerprint="old").save(tmp_path / "idx")
    make_index(n=20, seed=3, fingerprint="new").save(tmp_path / "idx")
    loaded = PassageIndex.load(tmp_path / "idx")
    assert (loaded.manifest.encoder, len(loaded)) == ("new", 20)
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp or old folder left


def test_exception_mid_save_leaves_old_index_and_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_index(n=10, fingerprint="old").save(tmp_path / "idx")
    real_write = atomic.write_synced

    def write_then_fail(path: Path, blob: bytes) -> None:
        real_write(path, blob)  # a real, complete file in the temp folder ...
        if path.name == "documents.jsonl":
            raise KeyboardInterrupt  # ... then the build is interrupted

    monkeypatch.setattr(atomic, "write_synced", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_index(n=20, fingerprint="new").save(tmp_path / "idx")
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]
    loaded = PassageIndex.load(tmp_path / "idx", expect_fingerprint="old")
    assert len(loaded) == 10


def test_save_refuses_to_replace_a_file(tmp_path: Path) -> None:
    (tmp_path / "idx").write_text("precious")
    with pytest.raises(InvalidInputError, match="not an index folder"):
        make_index(n=3).save(tmp_path / "idx")
    assert (tmp_path / "idx").read_text() == "precious"
