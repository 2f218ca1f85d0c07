"""The question side of a loaded encoder as three steps (tokenize, transformer, head), so that a
LoRA can wrap the middle one while the passage side, and so the index, stays exactly as it was.

The RAG paper fine-tunes the question encoder q(x) and keeps the document encoder d(z) and the
index frozen. A sentence-transformers encoder is one model for both sides, so its LoRA cannot
be injected into the model that embeds passages: passage vectors computed later (an index
build, a live document update) would change under it. Training (app/training/question.py) and
serving (app/lora/question_adapters.py) therefore wrap a *copy* of the question side's
transformer (MiniLM: 22M parameters, ~90 MB) and leave the server's encoder alone. DPR has a
separate question model; the copy is made the same way so both kinds follow one path.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from app.errors import InvalidInputError
from app.retrieval.encoders import DPREncoder, SentenceTransformerEncoder, TextEncoder

Features = dict[str, Any]


@dataclass
class QuestionTower:
    """q(x) as three steps, so LoRA can wrap the middle one: tokenize, transformer, head.

    `transformer` is the server encoder's own module: never train or wrap it in place, wrap
    `copy_transformer()` instead.
    """

    fingerprint: str  # the encoder's (TextEncoder.fingerprint)
    dim: int
    transformer: nn.Module  # a transformers model (BertModel): what LoRA adapts
    device: torch.device
    tokenize: Callable[[list[str]], Features]
    head: Callable[[Tensor, Features], Tensor]  # (last hidden [n, T, H], features) -> [n, dim]

    def copy_transformer(self) -> nn.Module:
        return copy.deepcopy(self.transformer).eval().requires_grad_(False)

    def encode(
        self, texts: Sequence[str], model: nn.Module | None = None, **forward_kwargs: Any
    ) -> Tensor:
        """[n, dim] question vectors through `model` (default: the frozen transformer);
        differentiable unless called under no_grad/inference_mode."""
        features = self.tokenize(list(texts))
        inputs = {
            k: v.to(self.device)
            for k, v in features.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        out = (model if model is not None else self.transformer)(
            **inputs, return_dict=True, **forward_kwargs
        )
        return self.head(out.last_hidden_state, {**features, **inputs})


def tower_of(encoder: TextEncoder) -> QuestionTower:
    """The question side of a loaded encoder, as a QuestionTower."""
    if isinstance(encoder, SentenceTransformerEncoder):
        return _sentence_transformer_tower(encoder)
    if isinstance(encoder, DPREncoder):
        return _dpr_tower(encoder)
    raise InvalidInputError(
        f"question-encoder adapters support sentence-transformers and DPR encoders, "
        f"not {type(encoder).__name__} ({encoder.fingerprint!r})"
    )


def _sentence_transformer_tower(encoder: SentenceTransformerEncoder) -> QuestionTower:
    st = encoder._model  # encoders.py exposes no public handle on the model
    modules = list(st)
    first = modules[0]
    transformer = getattr(first, "auto_model", None)
    if transformer is None or getattr(first, "module_output_name", "") != "token_embeddings":
        raise InvalidInputError(
            f"sentence-transformers encoder {encoder.fingerprint!r} does not start with a "
            "transformer giving token embeddings; question adapters cannot wrap it"
        )
    rest = modules[1:]  # Pooling, Normalize, ... : parameter-free for the MiniLM family

    def head(hidden: Tensor, features: Features) -> Tensor:
        feats = {**features, "token_embeddings": hidden}
        for module in rest:
            feats = module(feats)
        vectors: Tensor = feats["sentence_embedding"]
        return vectors

    def tokenize(texts: list[str]) -> Features:
        features: Features = st.preprocess(texts)
        return features

    return QuestionTower(encoder.fingerprint, encoder.dim, transformer, st.device, tokenize, head)


def _dpr_tower(encoder: DPREncoder) -> QuestionTower:
    q_model, tok = encoder._q_model, encoder._q_tok  # no public handle in encoders.py
    inner = q_model.question_encoder  # transformers' DPREncoder: bert_model + optional proj
    max_length = encoder._max_length(q_model)

    def head(hidden: Tensor, features: Features) -> Tensor:
        pooled = hidden[:, 0, :]  # [n, H]: the [CLS] vector, as DPR pools
        if getattr(inner, "projection_dim", 0) > 0:
            pooled = inner.encode_proj(pooled)  # [n, dim]
        return pooled

    def tokenize(texts: list[str]) -> Features:
        batch = tok(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return dict(batch)

    return QuestionTower(
        encoder.fingerprint, encoder.dim, inner.bert_model, encoder.device, tokenize, head
    )
