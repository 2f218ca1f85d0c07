"""Passage embedding under bfloat16 autocast (the index build's --bf16) against float32.

The tiny encoders come from tests/tiny_encoders.py (a real sentence-transformers folder and a
DPR pair, saved to tmp_path).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import DPRContextEncoder, DPRQuestionEncoder

from app.contracts import Passage
from app.retrieval.encoders import EncoderLoadError, load_encoder
from tests.tiny_encoders import dpr_folder, tiny_sentence_transformer

PASSAGES = [
    Passage("a:0", "a", "Glacier", "the glacier flows and the ice forms of snow"),
    Passage("b:0", "b", "Piano", "a hammer strikes the strings and the piano makes sound"),
    Passage("c:0", "c", "", "bread rises when the yeast is made in the lake"),
]


def _check(fp32: np.ndarray, bf16: np.ndarray) -> None:
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert not np.array_equal(fp32, bf16), "autocast had no effect: the bf16 path did not run"
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() > 0.999  # bfloat16 keeps 8 bits of mantissa: close, not equal


def test_sentence_transformer_bf16_passages_match_float32(tmp_path: Path) -> None:
    folder = str(tiny_sentence_transformer(tmp_path))
    plain = load_encoder(folder, "sentence-transformers")
    fast = load_encoder(folder, "sentence-transformers", passage_autocast="bfloat16")
    assert fast.fingerprint == plain.fingerprint  # same weights: the index stays compatible
    _check(plain.encode_passages(PASSAGES), fast.encode_passages(PASSAGES))
    questions = ["what flows?", "who plays the piano?"]
    np.testing.assert_array_equal(
        plain.encode_questions(questions), fast.encode_questions(questions)
    )


def test_dpr_bf16_passages_match_float32(tmp_path: Path) -> None:
    q, c = (
        str(dpr_folder(tmp_path, DPRQuestionEncoder, 1)),
        str(dpr_folder(tmp_path, DPRContextEncoder, 2)),
    )
    plain = load_encoder(q, "dpr", context_spec=c)
    fast = load_encoder(q, "dpr", context_spec=c, passage_autocast="bfloat16")
    _check(plain.encode_passages(PASSAGES), fast.encode_passages(PASSAGES))


def test_unknown_autocast_is_refused_by_name(tmp_path: Path) -> None:
    folder = str(tiny_sentence_transformer(tmp_path))
    with pytest.raises(EncoderLoadError, match="passage_autocast"):
        load_encoder(folder, "sentence-transformers", passage_autocast="float8")  # type: ignore[arg-type]
