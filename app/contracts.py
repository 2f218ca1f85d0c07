"""What two layers share, and nothing else: the value types and literals that cross layers.

Retrieval produces `Passage` and `Hit`; generation reads them; the API and the CLI speak the
decoding literals; adapters and the generator agree on PEFT's file names and on the name of
"no adapter"; the adapter registry reaches the generator through `AdapterHost`. Each is defined
here once, so no layer imports another's internals for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

if TYPE_CHECKING:  # annotations only: importing this module stays free of torch
    from torch import nn

Mode = Literal["concat", "token", "sequence"]  # concat prompt, RAG-Token, RAG-Sequence
MODES: tuple[Mode, ...] = get_args(Mode)
Decoding = Literal["thorough", "fast"]  # RAG-Sequence's rescoring
# how passages are retrieved: dense (embeddings), sparse (BM25 over the words), hybrid (both,
# fused by reciprocal rank: app/retrieval/fusion.py)
SearchMode = Literal["dense", "sparse", "hybrid"]
SEARCH_MODES: tuple[SearchMode, ...] = get_args(SearchMode)
GeneratorKind = Literal["seq2seq", "causal"]  # the backend families
Turn = tuple[str, str]  # a chat message before the question: (system | user | assistant, text)
# how a row's prompt is made: rag, the question with its passages in lorag's RAG prompt; chat,
# the conversation as it is, through the chat template (no passages); raw, the question's text
# is the prompt itself (completions)
Template = Literal["rag", "chat", "raw"]

BASE_ADAPTER = "__base__"  # PEFT's adapter name for "no adapter" in a mixed batch
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder: its config ...
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # ... and its weights (never the pickle .bin)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # adapter and index names
NAME_RE = re.compile(NAME_PATTERN)


@dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable unit: about 100 words of a document (the RAG paper's unit)."""

    id: str  # "<doc_id>#<chunk number>", unique in an index
    doc_id: str  # the source document's id
    title: str
    text: str


@dataclass(frozen=True, slots=True)
class Hit:
    """A retrieved passage, its retrieval score and its document's metadata (what a filter
    matched against). The score is the embeddings' inner product (dense), BM25's (sparse) or
    RRF's (hybrid). `dense_best`, set by hybrid search only: the best dense score of the hit's
    question (the same on every hit of one question), so the abstention gate's cosine threshold
    still applies when the score itself is RRF's (app/retrieval/fusion.py)."""

    passage: Passage
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    dense_best: float | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a request picks its tokens: greedy (temperature 0, the default), or drawn from
    softmax(logits / temperature) within the top_p nucleus, from the request's own random
    stream (`seed`: the same answer whatever else shares the batch). `stop`: strings that end
    the answer (not included in it)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise ValueError(f"stop takes up to 4 non-empty strings, got {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflow; the nucleus is the argmax anyway (vLLM too)
        return self.temperature < 1e-5


GREEDY = Sampling()


@dataclass(frozen=True, slots=True)
class GenRow:
    """What the engine hands a generator: one request's question, passages and limits."""

    question: str
    passages: Sequence[Passage]
    adapter: str | None  # the PEFT adapter name installed in the model; None = the base
    max_new_tokens: int
    mode: Mode = "concat"
    decoding: Decoding = "thorough"  # RAG-Sequence only
    scores: Sequence[float] = ()  # retrieval scores of the passages: the prior's logits
    sampling: Sampling = GREEDY
    history: tuple[Turn, ...] = ()  # the conversation before the question, oldest first
    template: Template = "rag"


class AdapterHost(Protocol):
    """A model that carries adapters: what the adapter registry (app/lora) needs of a generator
    (app/generation), so that lora never imports generation. Generator satisfies it.

    `model` is settable because the registry owns it while it holds the host: it wraps the base
    model into a PeftModel on the first install, serves the plain model while one adapter is
    merged, and puts the unwrapped base back after the last unload. The generator only reads
    it, and nothing else may replace it once a registry holds the host.
    """

    model: nn.Module  # the module that serves: the base, a PeftModel, or the merged base
    base_epoch: int  # bumped by the registry whenever it changes the base weights (a merge)

    @property
    def kind(self) -> GeneratorKind:  # picks PEFT's task type and model class
        ...

    @property
    def model_id(self) -> str:  # the base checkpoint, checked against an adapter's config
        ...
