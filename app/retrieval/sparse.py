"""BM25 over passages (bm25s), kept in step with the docstore: the sparse half of hybrid search.

The sparse index is derived state. It holds no file of its own: a store rebuilds it from the
passages it loads (the snapshot plus the replayed update log, which is what makes the dense
index durable and kill -9 safe), and follows every applied upsert and delete. So after a crash
it holds exactly the acknowledged passages, as the docstore does.

The trade-off: bm25s precomputes each term's per-passage score (its IDF depends on every
passage), and has no incremental add or delete (xhluca/bm25s#5, #19, #129). So a change only
marks the index stale, and the next sparse search rebuilds it from cached tokens (each passage
is tokenized once); on the demo corpus (3375 passages) a rebuild takes about 0.1 s, at 10x
about 1.2 s (bench/RESULTS.md, "Hybrid retrieval"). A passage deleted while a rebuild runs is
excluded from that search at once (a mask over the built rows), so a deleted passage is never
returned; one added meanwhile is found from the next search on.

Tokens: lower case, words of two or more letters or digits, English stop words dropped (bm25s's
defaults), no stemming. A passage is indexed with its document's title.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import bm25s
import numpy as np

from app.contracts import Passage

logger = logging.getLogger(__name__)


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """The terms of each text, as passages and questions are both cut."""
    if not texts:
        return []
    tokens = bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)
    return [list(t) for t in tokens]


@dataclass(frozen=True)
class _Built:
    """One bm25s index over the live passages of one version."""

    version: int
    bm25: bm25s.BM25 | None  # None: no passages
    pids: np.ndarray  # [m] int64, the passage id of each indexed row, ascending


class SparseIndex:
    """BM25 over (pid, passage) pairs; thread-safe (its own locks, never the store's)."""

    def __init__(self, passages: Sequence[tuple[int, Passage]] = ()) -> None:
        self._texts: dict[int, str] = {pid: indexed_text(p) for pid, p in passages}
        self._tokens: dict[int, list[str]] = {}  # filled at a build, each passage once
        self._version = 0  # bumped by every change
        self._built: _Built | None = None
        self._lock = threading.Lock()  # _texts, _tokens, _version: held briefly
        self._build_lock = threading.Lock()  # one rebuild at a time; writers never wait on it
        self.last_build_s = 0.0

    def __len__(self) -> int:
        return len(self._texts)

    def add(self, pid: int, passage: Passage) -> None:
        with self._lock:
            self._texts[pid] = indexed_text(passage)
            self._tokens.pop(pid, None)
            self._version += 1

    def remove(self, pids: Sequence[int]) -> None:
        with self._lock:
            for pid in pids:
                self._texts.pop(pid, None)
                self._tokens.pop(pid, None)
            self._version += 1

    def search(
        self, questions: Sequence[str], k: int, allowed: np.ndarray | None = None
    ) -> list[list[tuple[int, float]]]:
        """Per question, up to k (pid, BM25 score) best first, among `allowed` pids (sorted
        int64; None: all). Only passages sharing a term with the question come back (a BM25
        score above 0); ties go to the lower pid."""
        built = self._current()
        with self._lock:
            if built.version == self._version:
                live = np.ones(len(built.pids), dtype=bool)
            else:  # rows deleted since the build never come back, even before the next one
                n = len(built.pids)
                live = np.fromiter((int(p) in self._texts for p in built.pids), bool, n)
        if allowed is not None:
            live &= np.isin(built.pids, allowed)
        out: list[list[tuple[int, float]]] = []
        for terms in tokenize(questions):
            if built.bm25 is None:
                out.append([])
                continue
            ids = built.bm25.get_tokens_ids(terms)
            if not ids:
                out.append([])
                continue
            scores = np.where(live, built.bm25.get_scores_from_ids(ids), 0.0)  # [m]
            top = np.argsort(-scores, kind="stable")[:k]
            out.append([(int(built.pids[i]), float(scores[i])) for i in top if scores[i] > 0])
        return out

    def _current(self) -> _Built:
        with self._build_lock:
            with self._lock:
                built = self._built
                if built is not None and built.version == self._version:
                    return built
                version = self._version
                pids = sorted(self._texts)
                todo = [pid for pid in pids if pid not in self._tokens]
                texts = [self._texts[pid] for pid in todo]
                tokens = {pid: self._tokens[pid] for pid in pids if pid in self._tokens}
            t0 = time.perf_counter()
            fresh = dict(zip(todo, tokenize(texts), strict=True))  # outside the lock
            with self._lock:
                for pid, terms in fresh.items():
                    if pid in self._texts:  # not deleted meanwhile
                        self._tokens[pid] = terms
            tokens.update(fresh)
            corpus = [tokens[pid] for pid in pids]
            bm25: bm25s.BM25 | None = None
            if pids:
                bm25 = bm25s.BM25()
                bm25.index(corpus, show_progress=False)
            self._built = _Built(version, bm25, np.array(pids, dtype=np.int64))
            self.last_build_s = time.perf_counter() - t0
            logger.debug("built BM25 over %d passages in %.3f s", len(pids), self.last_build_s)
            return self._built


def indexed_text(passage: Passage) -> str:
    """What BM25 reads of a passage (in every store): its document's title, then its text."""
    return f"{passage.title}\n{passage.text}"
