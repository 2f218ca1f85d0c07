"""A tiny deterministic text encoder for index tests: hashed character trigrams, normalized.

It is a real bag-of-n-grams encoder (texts sharing words score higher), needs no model and no
torch, and gives the same vectors in every process, so a test can compare an index a killed
subprocess wrote against vectors computed here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from app.contracts import Passage

DIM = 64


class HashEncoder:
    fingerprint = f"hash-trigram-{DIM}"
    dim = DIM

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)  # [n, DIM]
        for row, text in enumerate(texts):
            padded = f"  {text.lower()} "
            for i in range(len(padded) - 2):
                digest = hashlib.blake2b(padded[i : i + 3].encode(), digest_size=4).digest()
                value = int.from_bytes(digest, "little")
                out[row, value % DIM] += 1.0 if value & (1 << 31) else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm > 0:
                out[row] /= norm
        return out

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self._encode(questions)

    def encode_passages(
        self, passages: Sequence[Passage], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        return self._encode([f"{p.title}\n{p.text}" for p in passages])
