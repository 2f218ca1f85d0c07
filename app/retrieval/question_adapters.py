"""Question-encoder LoRA: a differentiable question tower for training, per-request question
adapters for serving, and the passage side (so the index) left exactly as it was.

The RAG paper fine-tunes the question encoder q(x) and keeps the document encoder d(z) and the
index frozen. A sentence-transformers encoder is one model for both sides, so its LoRA cannot
be injected into the model that embeds passages: passage vectors computed later (an index
build, a live document update) would change under it. Training and serving therefore wrap a
*copy* of the question side's transformer (MiniLM: 22M parameters, ~90 MB) and leave the
server's encoder alone. DPR has a separate question model; the copy is made the same way so both
kinds follow one path.

Serving (QuestionAdapters) keeps every loaded question adapter in one PeftModel around that copy
and picks the adapter per forward call with PEFT's `adapter_names` (no shared `set_adapter`), so
two requests with different adapters cannot see each other's. Installs and deletes mutate the
copy; RagService runs them, like every encode, on its single retrieval thread, which serializes
them with the forwards (see RagService._retrieval).
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import Tensor, nn

from app.errors import AdapterNotFound, InvalidInputError
from app.lora.registry import load_lora_weights
from app.lora.validate import BaseLayout, ValidatedAdapter, describe
from app.retrieval.encoders import DPREncoder, SentenceTransformerEncoder, TextEncoder

log = logging.getLogger(__name__)

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


def question_layout(tower: QuestionTower) -> BaseLayout:
    """What validate_adapter checks a question adapter's files against.

    The kind is only used to check a task_type; question adapters are saved with none
    (a bare PeftModel around the transformer), so the check does not apply."""
    return BaseLayout.of(tower.transformer, "causal", tower.fingerprint)


@dataclass(frozen=True)
class QuestionAdapterInfo:
    name: str
    path: str  # relative to the adapters root
    version: str  # sha256 of its adapter_model.safetensors, first 12 hex digits
    rank: int
    target_modules: list[str]
    bytes: int


class QuestionAdapters:
    """Loaded question-encoder adapters by public name; encode questions through one of them.

    Call install/discard/encode from one thread (RagService's retrieval thread); name lookups
    (`in`, info, names) may run anywhere."""

    def __init__(self, encoder: TextEncoder) -> None:
        self.encoder = encoder
        self._tower: QuestionTower | None = None  # built on first use: it inspects the model
        self._peft: PeftModel | None = None  # the copy, wrapped once an adapter is installed
        self._entries: dict[str, tuple[str, QuestionAdapterInfo]] = {}  # name -> internal, info
        self._lock = threading.Lock()  # guards _entries for readers on other threads
        self._ids = 0

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    @property
    def tower(self) -> QuestionTower:
        if self._tower is None:
            self._tower = tower_of(self.encoder)
        return self._tower

    def layout(self) -> BaseLayout:
        return question_layout(self.tower)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._entries

    def info(self, name: str) -> QuestionAdapterInfo | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry[1] if entry is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def install(self, name: str, prepared: ValidatedAdapter) -> QuestionAdapterInfo:
        """Add prepared as name (replacing name's previous one); on failure nothing changes."""
        self._ids += 1
        internal = f"q{self._ids}"
        config = copy.deepcopy(prepared.config)
        config.task_type = None
        created = self._peft is None
        model: PeftModel = (
            PeftModel(self.tower.copy_transformer(), config, adapter_name=internal)
            if self._peft is None
            else self._peft
        )
        try:
            if not created:
                model.add_adapter(internal, config)
            load_lora_weights(
                model,
                prepared,
                internal,
                f"question-encoder adapter {prepared.rel!r}",
                f"the encoder {self.fingerprint!r}",
            )
        except Exception:
            if not created:
                model.delete_adapter(internal)
            raise
        self._peft = model.eval()
        desc = describe(prepared.config)
        info = QuestionAdapterInfo(
            name, prepared.rel, prepared.version, desc["rank"], desc["target_modules"],
            prepared.bytes,
        )  # fmt: skip
        with self._lock:
            old = self._entries.get(name)
            self._entries[name] = (internal, info)
        if old is not None:
            self._peft.delete_adapter(old[0])
        log.info("question-encoder adapter %r (%s) installed as %s", name, prepared.rel, internal)
        return info

    def discard(self, name: str) -> bool:
        """Remove name's question adapter if it has one; the copy goes with the last."""
        with self._lock:
            entry = self._entries.pop(name, None)
        if entry is None:
            return False
        assert self._peft is not None
        if len(self._peft.peft_config) == 1:
            self._peft = None  # frees the copy of the transformer
        else:
            self._peft.delete_adapter(entry[0])
        log.info("question-encoder adapter %r removed", name)
        return True

    def encode(self, questions: Sequence[str], name: str) -> np.ndarray:
        """[n, dim] float32 question vectors through name's adapter."""
        with self._lock:
            entry = self._entries.get(name)
        if entry is None or self._peft is None:
            raise AdapterNotFound(name)
        # adapter_names picks the adapter for this call only; nothing global is switched
        with torch.inference_mode():
            vectors = self.tower.encode(
                questions, self._peft, adapter_names=[entry[0]] * len(questions)
            )
        return np.ascontiguousarray(vectors.float().cpu().numpy(), dtype=np.float32)
