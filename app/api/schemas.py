"""Request and response schemas: separate types, validated at the edge."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.contracts import NAME_PATTERN, Mode, SearchMode

ADAPTER_NAME = NAME_PATTERN
INDEX_NAME = ADAPTER_NAME  # a folder under index_dir, by the same rule


def _no_control_chars(value: str) -> str:
    bad = [c for c in value if ord(c) < 32 and c not in "\t\n\r"]
    if bad:
        raise ValueError(f"contains control character {bad[0]!r}")
    return value


class AskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(..., min_length=1, max_length=2000, examples=["What is albedo?"])
    adapter: str | None = Field(
        None, pattern=ADAPTER_NAME, description="A loaded adapter, or none."
    )
    top_k: int | None = Field(None, ge=1, le=50, description="Passages to retrieve (default 5).")
    max_new_tokens: int | None = Field(None, ge=1, le=512)
    mode: Mode | None = Field(
        None,
        description="concat: one prompt with all passages; token: RAG-Token, marginalizing "
        "over passages at every token; sequence: RAG-Sequence, per-passage answers "
        "marginalized. Default: the server's LORAG_MODE.",
    )
    decoding: Literal["thorough", "fast"] = Field(
        "thorough", description="RAG-Sequence only: rescore every hypothesis, or fast."
    )
    index: str | None = Field(
        None,
        pattern=INDEX_NAME,
        description="A named index under the index root; default: the active one (GET /index).",
    )
    filter: dict[str, Any] | None = Field(
        None,
        description="Retrieve only passages of documents whose metadata matches: "
        '{"lang": "en", "year": {"$gte": 2000}}; keys ANDed; operators $in, $ne, $gt, $gte, '
        "$lt, $lte (numbers); anything else is refused (422).",
        examples=[{"lang": "en"}],
    )
    retrieval: SearchMode | None = Field(
        None,
        description="dense: by embedding similarity; sparse: BM25 over the passages' words "
        "(exact terms, names, numbers); hybrid: both, fused by reciprocal rank (k=60). The "
        "passages' `score` is the cosine, the BM25 score or the RRF score. Default: the "
        "server's LORAG_RETRIEVAL.",
    )
    stream: bool = Field(
        False,
        description="Answer as server-sent events: passages, then the answer's text as it is "
        "decoded, then the whole response (see POST /ask).",
    )
    temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="0: greedy; above: sampled from softmax(logits / t)."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Sample within this nucleus.")
    seed: int | None = Field(
        None, ge=0, description="Makes a sampled answer reproducible, whatever shares the batch."
    )
    stop: list[str] = Field(
        default_factory=list, max_length=4, description="Strings that end the answer (cut off)."
    )

    _check_question = field_validator("question")(_no_control_chars)

    @field_validator("question")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("is blank")
        return v


class PassageOut(BaseModel):
    id: str
    doc_id: str
    title: str
    text: str
    score: float = Field(description="Retrieval score: inner product of the embeddings.")
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="The passage's document's metadata (POST /documents)."
    )
    weight: float = Field(
        description="How much the passage counted: the prior p(z|x) for concat, the "
        "posterior p(z|x,y) for token and sequence. Sums to 1."
    )


class Timings(BaseModel):
    retrieve: float
    generate: float
    total: float
    reused_prompt_tokens: int = Field(
        0, description="Prompt tokens whose keys and values came from the prefix cache."
    )


class AskResponse(BaseModel):
    answer: str
    adapter: str | None
    adapter_version: str | None
    mode: str
    passages: list[PassageOut]
    timings_ms: Timings
    generated_tokens: int = Field(
        description="Tokens the generator produced for the answer (end of sequence included)."
    )
    finish_reason: Literal["stop", "length"] = Field(
        description="stop: an end token or a stop string ended the answer; length: "
        "max_new_tokens did."
    )
    abstained: bool = Field(
        False,
        description="The passages do not support an answer (LORAG_ABSTAIN): `answer` says the "
        "documents do not contain it; the passages searched are still listed.",
    )
    citations_moved: int = Field(
        0,
        description="Citation marks [n] the citation check moved to the passage that holds "
        "what they cite (LORAG_CHECK_CITATIONS); a streamed answer's pieces already carry them.",
    )
    request_id: str


class QuestionEncoderOut(BaseModel):
    path: str = Field(description="The question-encoder adapter folder, under the adapters root.")
    version: str = Field(description="Content hash of its weights.")
    rank: int
    target_modules: list[str]
    bytes: int


class TaskOut(BaseModel):
    mode: str | None = Field(description="Decoding mode used when a request names none.")
    top_k: int | None = Field(description="Passages retrieved when a request names no top_k.")
    question_encoder: QuestionEncoderOut | None = Field(
        description="The question-encoder adapter /ask encodes questions with, if any."
    )


class AdapterOut(BaseModel):
    name: str
    path: str
    version: str = Field(description="Content hash of the adapter weights.")
    rank: int
    alpha: float
    target_modules: list[str]
    base_model: str | None
    bytes: int = Field(description="Size of the adapter's weights file.")
    resident_bytes: int = Field(
        description="Memory its LoRA weights take in the model (what the budget counts)."
    )
    loaded_at: datetime
    pinned: bool = Field(description="Pinned adapters are never evicted.")
    last_used: datetime | None = Field(description="When a batch last ran a request with it.")
    requests_served: int = Field(description="Requests that ran with it since it was loaded.")
    task: TaskOut | None = Field(
        None, description="Present when the folder is a task bundle (it has lorag_task.json)."
    )


class AdapterList(BaseModel):
    adapters: list[AdapterOut]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        ..., min_length=1, max_length=512, description="Folder relative to the adapters root."
    )
    pinned: bool = Field(
        False, description="Never evict it to make room under the adapter memory budget."
    )

    _check_path = field_validator("path")(_no_control_chars)


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    detail: str | None = None


# documents and indexes (app/api/documents.py, app/api/index.py) ------------------------------


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=256, description="Document id; replaces one.")
    title: str = Field("", max_length=1000)
    text: str = Field(..., description="Chunked into ~100-word passages and embedded.")
    metadata: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Kept with the document (GET /documents/{id})."
    )


class DocumentsIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(..., min_length=1)


class DocumentResult(BaseModel):
    id: str
    passages: int = Field(description="Passages the document was chunked into.")
    replaced: bool = Field(description="A document with this id was there and is replaced.")


class DocumentsOut(BaseModel):
    index: str
    documents: list[DocumentResult]


class DocumentOut(BaseModel):
    id: str
    index: str
    title: str
    metadata: dict[str, str | int | float | bool | None]
    passages: list[str] = Field(description="Passage texts, in order.")


class IndexOut(BaseModel):
    name: str
    active: bool
    loaded: bool
    passages: int | None = Field(description="None until the index is loaded.")
    documents: int | None
    type: str | None = Field(
        description="The index: FAISS's, e.g. 'IDMap2,HNSW32,Flat IP', or PostgreSQL's, e.g. "
        "'hnsw vector_ip_ops m=16 ef_construction=64'."
    )
    pending_updates: int | None = Field(
        description="Update-log records not yet compacted into the snapshot."
    )


class IndexList(BaseModel):
    active: str
    indexes: list[IndexOut]


class IndexSelect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=INDEX_NAME, description="The index /ask reads by default.")


class CompactOut(BaseModel):
    index: str
    compacted: bool = Field(description="False when there was nothing to fold into a snapshot.")
