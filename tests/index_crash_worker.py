"""The process tests/test_index_crash.py kills: a loop of builds, updates and compactions.

    python tests/index_crash_worker.py FOLDER PROGRESS SEED FIRST_OP KIND

Operation k is a pure function of (seed, k, the documents in the index), so the test can replay
the same sequence on a plain dict and know the state before and after each operation. Before
operation k the worker appends "start k" to PROGRESS, after it "done k"; a kill between the two
leaves the operation in flight, and the index must then hold the state before it or after it.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from app.retrieval.ann import AnnSpec
from app.retrieval.atomic import remove_stale_temp
from app.retrieval.chunking import chunk_document
from app.retrieval.live import LiveIndex, folder_lock
from app.retrieval.store import PassageIndex
from app.retrieval.updates import Document, prepare
from tests.hash_encoder import HashEncoder

WORDS = 20  # words per passage
POOL = 24  # document ids d0..d23
ENCODER = HashEncoder()
VOCAB = ["salt", "pine", "iron", "moss", "tide", "ash", "reed", "flint", "dune", "kiln", "opal"]

Op = tuple[
    str, dict[str, str]
]  # ("upsert", docs) | ("delete", {id: ""}) | ("compact"|"build", ...)


def text(seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"{rng.choice(VOCAB)}{rng.randint(0, 50)}" for _ in range(rng.randint(8, 70)))


def choose(seed: int, k: int, present: set[str]) -> Op:
    rng = random.Random(seed * 1_000_003 + k)
    roll = rng.random()
    if roll < 0.05:  # a whole new build replacing the folder
        ids = rng.sample(range(POOL), 12)
        return "build", {f"d{i}": text(seed + 7 * k + i) for i in ids}
    if roll < 0.2:
        return "compact", {}
    if roll < 0.45 and present:
        return "delete", {rng.choice(sorted(present)): ""}
    ids = rng.sample(range(POOL), rng.randint(1, 4))
    return "upsert", {f"d{i}": text(seed + 31 * k + i) for i in ids}


def apply(state: dict[str, str], op: Op) -> dict[str, str]:
    """The reference: the documents (id -> text) after `op`."""
    kind, docs = op
    if kind == "build":
        return dict(docs)
    if kind == "upsert":
        return {**state, **docs}
    if kind == "delete":
        return {d: t for d, t in state.items() if d not in docs}
    return dict(state)


def build(folder: Path, docs: dict[str, str], kind: str) -> None:
    """What `lorag index build` does, with the test's encoder: embed, then save under the lock."""
    passages = [p for d, t in docs.items() for p in chunk_document(d, f"title {d}", t, WORDS)]
    index = PassageIndex.build(
        passages,
        ENCODER.encode_passages(passages),
        ENCODER.fingerprint,
        spec=AnnSpec(kind=kind, ef_search=256),  # type: ignore[arg-type]
        chunk_words=WORDS,
    )
    with folder_lock(folder):
        remove_stale_temp(folder)
        index.save(folder)


def run(folder: Path, progress: Path, seed: int, first: int, kind: str) -> None:
    live = LiveIndex.open(folder)
    out = os.open(progress, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for k in range(first, first + 100_000):
        present = {d.id for d in live.index.documents()}
        op_kind, docs = choose(seed, k, present)
        os.write(out, f"start {k}\n".encode())
        if op_kind == "build":
            build(folder, docs, kind)
            live = LiveIndex.open(folder)
        elif op_kind == "compact":
            live.compact()
        elif op_kind == "delete":
            live.delete(list(docs))
        else:
            documents = [Document(d, f"title {d}", t) for d, t in docs.items()]
            live.upsert(prepare(documents, ENCODER, words=WORDS))
        os.write(out, f"done {k}\n".encode())


if __name__ == "__main__":
    folder_arg, progress_arg, seed_arg, first_arg, kind_arg = sys.argv[1:6]
    run(Path(folder_arg), Path(progress_arg), int(seed_arg), int(first_arg), kind_arg)
