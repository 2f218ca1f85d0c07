"""kill -9 a real process at random points of builds, updates and compactions: the index must
start, and hold the state before the operation in flight or the state after it, never another.

The worker (tests/index_crash_worker.py) runs a deterministic sequence of operations; the test
replays it on a dict, so it knows both candidate states, and checks the folder's documents and
its search results (against exact numpy search over the candidate's own vectors).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.errors import IndexInvalid
from app.retrieval.chunking import chunk_document
from app.retrieval.manifest import INDEX_FILE, LOG_FILE
from app.retrieval.store import PassageIndex
from tests import index_crash_worker as worker

ROOT = Path(__file__).resolve().parents[1]
QUERIES = [worker.text(5000 + i) for i in range(6)]


def documents(index: PassageIndex) -> dict[str, str]:
    return {d.id: " ".join(p.text for p in d.passages) for d in index.documents()}


def normalized(state: dict[str, str]) -> dict[str, str]:
    return {d: " ".join(t.split()) for d, t in state.items()}


def check_search(index: PassageIndex, state: dict[str, str], k: int) -> None:
    """The index's top-k equals exact numpy search over the state's passages, up to ties: the
    scores match rank by rank, and every hit scores at least the exact k-th best."""
    passages = {
        p.id: p
        for d, t in sorted(state.items())
        for p in chunk_document(d, f"title {d}", t, worker.WORDS)
    }
    ids = list(passages)
    vectors = worker.ENCODER.encode_passages(list(passages.values()))  # [n, dim]
    scores = worker.ENCODER.encode_questions(QUERIES) @ vectors.T  # [q, n]
    found = index.search(worker.ENCODER.encode_questions(QUERIES), k)
    for row, hits in zip(scores, found, strict=True):
        best = np.sort(row)[::-1][:k]  # [k]
        np.testing.assert_allclose([h.score for h in hits], best, atol=1e-5)
        for hit in hits:
            assert row[ids.index(hit.passage.id)] >= best[-1] - 1e-5, hit.passage.id


def last_progress(progress: Path) -> tuple[str, int] | None:
    lines = progress.read_text().split()
    return (lines[-2], int(lines[-1])) if lines else None


def wait_for_first_op(progress: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if progress.exists() and progress.stat().st_size:
            return
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.005)
    raise AssertionError("worker did not start an operation in 30 s")


@pytest.mark.parametrize(("kind", "kills"), [("flat", 20), ("hnsw", 8)])
def test_kill_9_leaves_the_state_before_or_after_the_operation_in_flight(
    tmp_path: Path, kind: str, kills: int
) -> None:
    seed = {"flat": 1, "hnsw": 2}[kind]
    rng = random.Random(seed)
    folder = tmp_path / "idx"
    state = {f"d{i}": worker.text(i) for i in range(10)}
    worker.build(folder, state, kind)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    next_op, in_flight = 0, 0
    for cycle in range(kills):
        progress = tmp_path / f"progress-{cycle}"
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "index_crash_worker.py"), str(folder),
             str(progress), str(seed), str(next_op), kind],
            env=env, stderr=subprocess.PIPE,
        )  # fmt: skip
        wait_for_first_op(progress, proc)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()  # type: ignore[union-attr]

        # replay the worker's sequence on the reference up to the last operation it started
        mark = last_progress(progress)
        assert mark is not None
        what, last = mark
        for k in range(next_op, last):
            state = worker.apply(state, worker.choose(seed, k, set(state)))
        after = worker.apply(state, worker.choose(seed, last, set(state)))
        candidates = [after] if what == "done" else [state, after]
        in_flight += what == "start"

        loaded = PassageIndex.load(folder)  # must start: no IndexInvalid, whatever was torn
        got = documents(loaded)
        matches = [c for c in candidates if normalized(c) == got]
        assert matches, f"cycle {cycle}: op {last} ({what}) left {sorted(got)}"
        state = matches[0]
        check_search(loaded, state, 5)
        next_op = last + 1
    assert in_flight >= kills // 2  # most kills landed inside an operation, not between two
    # the survivors compact cleanly, and nothing a killed save left behind remains
    from app.retrieval.live import LiveIndex

    LiveIndex.open(folder).compact()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx")) == [".idx.lock"]
    assert documents(PassageIndex.load(folder)) == normalized(state)


@pytest.mark.parametrize("name", [INDEX_FILE, "passages.jsonl", "documents.jsonl", LOG_FILE])
def test_a_missing_file_is_reported_at_start_with_its_name(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "idx"
    worker.build(folder, {"d0": worker.text(0)}, "flat")
    (folder / name).unlink()
    with pytest.raises(IndexInvalid, match=f"{folder / name}: missing"):
        PassageIndex.load(folder)


def test_a_corrupt_index_file_is_reported_at_start_with_its_name(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    worker.build(folder, {"d0": worker.text(0)}, "flat")
    shutil.copy(folder / "passages.jsonl", folder / INDEX_FILE)
    with pytest.raises(IndexInvalid, match=f"{folder / INDEX_FILE}: sha256 differs"):
        PassageIndex.load(folder)
