"""Encoders on tiny BERTs (tests/tiny_encoders.py), checked against transformers run by hand.

The sentence-transformers model is a real ST folder (Transformer + mean Pooling + Normalize)
around a 2-layer BERT; the DPR pair are DPRQuestionEncoder/DPRContextEncoder from a DPRConfig.
Both are saved to tmp_path with a BertTokenizer made from a word-level vocab file, and loaded
through load_encoder, the same path a hub id or a real checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertModel, DPRContextEncoder, DPRQuestionEncoder

from app.contracts import Passage
from app.errors import InvalidInputError
from app.retrieval.encoders import (
    DPREncoder,
    EncoderLoadError,
    SentenceTransformerEncoder,
    TextEncoder,
    load_encoder,
)
from tests.tiny_encoders import HIDDEN, dpr_folder, tiny_sentence_transformer

PASSAGES = [
    Passage("g#0", "g", "Glacier", "the glacier ice flows"),
    Passage("p#0", "p", "Piano", "a piano hammer and strings made sound in the piano " * 3),
    Passage("b#0", "b", "Bread", "yeast"),
    Passage("l#0", "l", "", "the lake of eel and tide clock"),
]
QUESTIONS = ["how does a glacier form", "what made sound", "why did bread rise"]


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("st")
    tiny_sentence_transformer(root)
    return root


@pytest.fixture(scope="module")
def dpr_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dpr")
    return dpr_folder(root, DPRQuestionEncoder, 1), dpr_folder(root, DPRContextEncoder, 2)


def mean_pool_reference(folder: Path, texts: list[str]) -> np.ndarray:
    """What an all-MiniLM-style model computes: masked mean of BERT's last layer, normalized."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            batch = tok([text], return_tensors="pt")
            hidden = model(**batch).last_hidden_state[0]  # [T, H]
            vector = hidden.mean(dim=0)
            out.append((vector / vector.norm()).numpy())
    return np.stack(out)


def test_sentence_transformer_matches_mean_pooling_by_hand(st_folder: Path) -> None:
    encoder = load_encoder(str(st_folder / "tiny-st"), "sentence-transformers")
    assert isinstance(encoder, SentenceTransformerEncoder) and isinstance(encoder, TextEncoder)
    assert encoder.dim == HIDDEN
    assert encoder.fingerprint.startswith("sentence-transformers:tiny-st@")

    questions = encoder.encode_questions(QUESTIONS)  # [3, H]
    assert questions.dtype == np.float32 and questions.flags.c_contiguous
    np.testing.assert_allclose(
        questions, mean_pool_reference(st_folder / "bert", QUESTIONS), atol=1e-5
    )
    # passages carry their title on a line of its own; rows stay in input order (ST sorts inside)
    passages = encoder.encode_passages(PASSAGES, batch_size=2)
    texts = [f"{p.title}\n{p.text}" if p.title else p.text for p in PASSAGES]
    np.testing.assert_allclose(passages, mean_pool_reference(st_folder / "bert", texts), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(passages, axis=1), 1.0, atol=1e-6)
    assert encoder.encode_questions([]).shape == (0, HIDDEN)


def test_fingerprint_follows_the_weights_not_the_load(st_folder: Path, tmp_path: Path) -> None:
    a = load_encoder(str(st_folder / "tiny-st"), "sentence-transformers")
    b = load_encoder(str(st_folder / "tiny-st"), "sentence-transformers")
    assert a.fingerprint == b.fingerprint
    from sentence_transformers import SentenceTransformer

    changed = SentenceTransformer(str(st_folder / "tiny-st"), device="cpu")
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    changed.save(str(tmp_path / "tiny-st"))  # same folder name, other weights
    c = load_encoder(str(tmp_path / "tiny-st"), "sentence-transformers")
    assert c.fingerprint.split("@")[0] == a.fingerprint.split("@")[0]
    assert c.fingerprint != a.fingerprint


def dpr_reference(folder: Path, cls: type, *args: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(folder)
    model = cls.from_pretrained(folder).eval()
    with torch.no_grad():
        rows = [model(**tok(*[[a[i]] for a in args], return_tensors="pt")).pooler_output[0]
                for i in range(len(args[0]))]  # fmt: skip
    return torch.stack(rows).numpy()


def test_dpr_encoders_match_transformers_and_pair_title_with_text(
    dpr_folders: tuple[Path, Path],
) -> None:
    q_folder, c_folder = dpr_folders
    encoder = load_encoder(str(q_folder), "dpr", context_spec=str(c_folder))
    assert isinstance(encoder, DPREncoder) and encoder.dim == HIDDEN
    assert encoder.fingerprint.startswith(f"dpr:{q_folder.name}@")
    assert f"|{c_folder.name}@" in encoder.fingerprint

    questions = encoder.encode_questions(QUESTIONS)
    np.testing.assert_allclose(
        questions, dpr_reference(q_folder, DPRQuestionEncoder, QUESTIONS), atol=1e-5
    )
    # batched, length-sorted and padded, yet each row equals its own unpadded run
    passages = encoder.encode_passages(PASSAGES, batch_size=3)
    titles, texts = [p.title for p in PASSAGES], [p.text for p in PASSAGES]
    reference = dpr_reference(c_folder, DPRContextEncoder, titles, texts)
    np.testing.assert_allclose(passages, reference, atol=1e-5)
    assert passages.dtype == np.float32 and passages.flags.c_contiguous
    # the pair is really a pair: title [SEP] text differs from the concatenated string
    joined_texts = [f"{t} {x}" for t, x in zip(titles, texts, strict=True)]
    joined = dpr_reference(c_folder, DPRContextEncoder, joined_texts)
    assert not np.allclose(passages[0], joined[0], atol=1e-4)
    # the two encoders are different models
    assert not np.allclose(encoder.encode_questions(["glacier"]), dpr_reference(
        c_folder, DPRContextEncoder, ["glacier"]), atol=1e-4)  # fmt: skip


def test_dpr_projection_dims_must_agree(tmp_path: Path) -> None:
    q = dpr_folder(tmp_path, DPRQuestionEncoder, 1, projection_dim=16)
    c = dpr_folder(tmp_path, DPRContextEncoder, 2, projection_dim=0)
    with pytest.raises(EncoderLoadError, match=r"16-d .* 32-d"):
        load_encoder(str(q), "dpr", context_spec=str(c))
    c16 = dpr_folder(tmp_path, DPRContextEncoder, 2, projection_dim=16)
    assert load_encoder(str(q), "dpr", context_spec=str(c16)).dim == 16


def test_bad_specs_are_refused_naming_them(tmp_path: Path, dpr_folders: tuple[Path, Path]) -> None:
    q_folder, c_folder = dpr_folders
    with pytest.raises(EncoderLoadError, match="needs a context encoder"):
        load_encoder(str(q_folder), "dpr")
    with pytest.raises(EncoderLoadError, match="no DPR encoder ships offline"):
        load_encoder("default", "dpr", context_spec=str(c_folder))
    with pytest.raises(EncoderLoadError, match="share one model"):
        load_encoder("default", "sentence-transformers", context_spec=str(c_folder))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(InvalidInputError, match="no-such-model"):
        load_encoder(missing, "sentence-transformers")
    with pytest.raises(InvalidInputError, match="no-such-model"):
        load_encoder(str(q_folder), "dpr", context_spec=missing)
