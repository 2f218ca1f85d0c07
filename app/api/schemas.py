"""Request and response schemas: separate types, validated at the edge."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


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
    mode: Literal["concat", "token", "sequence"] | None = Field(
        None,
        description="concat: one prompt with all passages; token: RAG-Token, marginalizing "
        "over passages at every token; sequence: RAG-Sequence, per-passage answers "
        "marginalized. Default: the server's LORAG_MODE.",
    )
    decoding: Literal["thorough", "fast"] = Field(
        "thorough", description="RAG-Sequence only: rescore every hypothesis, or fast."
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
    weight: float = Field(
        description="How much the passage counted: the prior p(z|x) for concat, the "
        "posterior p(z|x,y) for token and sequence. Sums to 1."
    )


class Timings(BaseModel):
    retrieve: float
    generate: float
    total: float


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
    request_id: str


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
