"""The one settings object. Every field reads from the environment as LORAG_<FIELD>.

`Settings` is the env surface: flat fields, grouped by component below, each read as
LORAG_<FIELD> (and constructible as `Settings(field=value)`). Components never see it: each
takes its own frozen config, which a property here builds (`settings.engine`,
`settings.decoding`, `settings.encoder_spec`, ...), and app/wiring.py hands them over. The
configs' modules load on first use, so reading settings (`lorag --help`) imports no torch or
faiss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.contracts import Mode, SearchMode
from app.engine.config import EngineConfig
from app.generation.abstain import AbstainConfig
from app.generation.config import (
    ConcatOrder,
    DecodingConfig,
    DType,
    GeneratorSpec,
    PrefillDType,
    PromptConfig,
)

if TYPE_CHECKING:
    from app.db.config import DatabaseConfig
    from app.lora.residency import ResidencyPolicy
    from app.retrieval.ann import AnnSpec
    from app.retrieval.config import EncoderSpec
    from app.retrieval.manager import CompactionPolicy
    from app.retrieval.pg_schema import PgIndexSpec
    from app.retrieval.pg_search import PgSearchConfig
    from app.retrieval.updates import UpdateLimits

DEFAULT = "default"  # the packaged offline model for that role


# The root's own configs, for the HTTP edge (app/main.py) and the server (app/server.py). They
# live here, not beside their users: app/state.py imports this module, so it must not import
# app.api or app.server (which imports the routes), or the layers would point upwards.


@dataclass(frozen=True)
class SecurityConfig:
    admin_token: SecretStr | None = None  # mutating routes; None: open
    api_token: SecretStr | None = None  # /ask; None: open
    max_body_bytes: int = 64 * 1024
    cors_origins: tuple[str, ...] = ()  # empty: CORS off

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if "" in self.cors_origins:
            raise ValueError("cors_origins holds an empty origin")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    drain_s: float = 5.0  # SIGTERM: /ready says 503 this long while /ask is still answered
    grace_s: float = 30.0  # then admitted requests get this long to finish

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        for name in ("drain_s", "grace_s"):
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0 s, got {value!r}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAG_", env_file=".env", extra="ignore")

    # data roots: the service reads them, the CLI writes them
    index_dir: Path = Field(Path("index"), description="Root of built indexes.")
    index_name: str = Field("demo", description="Index under index_dir that /ask reads.")
    adapters_dir: Path = Field(
        Path("adapters"), description="Root that adapter paths resolve under."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "lorag",
        description="Converted model weights (the default generator's safetensors folder).",
    )

    # models
    encoder: str = Field(
        DEFAULT, description="Question/passage encoder: hub id, path or 'default'."
    )
    encoder_kind: Literal["sentence-transformers", "dpr"] = "sentence-transformers"
    dpr_context_encoder: str | None = Field(
        None, description="DPR passage encoder (hub id or path) when encoder_kind=dpr."
    )
    generator: str = Field(DEFAULT, description="Generator: hub id, path or 'default'.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps.")
    dtype: DType = "float32"
    torch_threads: int = Field(
        0,
        ge=0,
        description="torch intra-op threads; 0 keeps torch's default (all cores). Set it to the "
        "container's CPU limit: torch counts the host's cores, and oversubscribed threads "
        "spin (measured here: 2 threads on a busy 2-core machine ran 6x slower than 1).",
    )

    # FAISS index kind and search parameters (app/retrieval/ann.py; measured in bench/RESULTS.md)
    index_type: Literal["auto", "flat", "hnsw", "ivf_pq", "ivf_sq"] = Field(
        "auto",
        description="Index kind of `lorag index build`; auto: flat (exact) up to 200k passages, "
        "IVF-SQ8 beyond (bench/RESULTS.md).",
    )
    hnsw_m: int = Field(32, ge=2, le=256, description="HNSW graph neighbours per node (build).")
    hnsw_ef_construction: int = Field(
        200, ge=1, description="HNSW candidate list while building; higher: slower, better graph."
    )
    hnsw_ef_search: int = Field(
        64, ge=1, description="HNSW candidate list per query; higher: better recall, slower."
    )
    ivf_nlist: int | None = Field(
        None, ge=1, le=65536, description="IVF buckets (build); unset: about 4*sqrt(passages)."
    )
    ivf_nprobe: int = Field(32, ge=1, description="IVF buckets scanned per query.")
    pq_m: int | None = Field(
        None, ge=1, description="ivf_pq bytes per vector (must divide the dimension); unset: dim/8."
    )

    # request defaults and limits
    top_k: int = Field(5, ge=1, le=50)
    max_new_tokens: int = Field(64, ge=1, le=512)
    mode: Mode = Field(
        "concat", description="Decoding mode when the request does not say (see README)."
    )
    retrieval: SearchMode = Field(
        "dense",
        description="How /ask retrieves when the request does not say: dense (embeddings), "
        "sparse (BM25) or hybrid (both, reciprocal rank fusion). Chosen in bench/RESULTS.md, "
        "'Hybrid retrieval'. The abstention gate (abstain_min_score) reads dense cosines: "
        "the hits' under dense, the dense half's best under hybrid; sparse is not gated.",
    )
    concat_order: ConcatOrder = Field(
        "score",
        description="Concat mode's passage order, in the prompt and in the answer's `passages`: "
        "score (retrieval order, best first) or stable (by document, then ordinal, so prompts "
        "over overlapping passages share longer prefixes for the prefix cache; the budget still "
        "drops the lowest-ranked first). Chosen in bench/RESULTS.md, 'Concat passage order'.",
    )
    num_beams: int = Field(1, ge=1, le=8, description="Beams for the token/sequence modes.")
    min_prior: float | None = Field(
        None, ge=0, lt=1, description="Drop passages whose prior p(z|x) is below this."
    )
    request_timeout_s: float = Field(120.0, gt=0)
    abstain: bool = Field(
        True,
        description="Grounded abstention: answer that the documents do not contain the answer "
        "when no passage supports one (app/generation/abstain.py).",
    )
    abstain_min_score: float = Field(
        0.45,
        ge=-1,
        le=1,
        description="Abstain when the best passage's retrieval score is below this (cosine for "
        "the default encoder; chosen in bench/RESULTS.md, 'Answer quality').",
    )
    abstain_min_support: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Abstain, after generation, when less than this share of the answer's "
        "content words (stemmed, function words out) occurs in the retrieved passages; 0 turns "
        "this check off (chosen in bench/RESULTS.md, 'Abstention: signals tried').",
    )
    check_citations: bool = Field(
        True,
        description="Check each citation mark [n] of a concat answer against the passages: a "
        "mark whose passage holds less than half of the words it cites moves to the passage "
        "holding the most (app/generation/citations.py; bench/RESULTS.md, 'The citation check').",
    )

    # engine
    max_batch_size: int = Field(
        8,
        ge=1,
        description="Most rows decoded together (a RAG-Token or RAG-Sequence request takes one "
        "per passage).",
    )
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits to fill.")
    expect_wait_ms: float = Field(
        200.0,
        ge=0,
        description="How long a forming batch may wait for requests already admitted and still "
        "retrieving their passages (never for requests not yet sent).",
    )
    step_batching: bool = Field(
        True,
        description="Step-level batching: requests join a running batch between decoding "
        "steps and leave when their answer ends (off: every batch decodes to its longest answer).",
    )
    prefill_tokens_per_step: int = Field(
        1024,
        ge=0,
        description="Step-level batching: most prompt tokens prefilled between two decoding steps "
        "while rows are decoding (more joiners wait for the next step boundary), which bounds "
        "the pause a burst of arrivals puts between two tokens of a running answer; at least "
        "one request joins at each boundary. A joiner counts the tokens its prefill computes: "
        "its prompt less the prefix the prefix cache holds for it. 0: no limit.",
    )
    prefix_cache_bytes: int = Field(
        256 * 1024 * 1024,
        ge=0,
        description="Bytes kept for reuse across requests, least recently used first out "
        "(app/generation/prefix_cache.py): decoder-only generators keep prompt-prefix keys and "
        "values (a joining row prefills only what follows its longest cached prefix), "
        "encoder-decoders an identical input's encoder output (a joining row whose input is "
        "cached skips the encoder). 0: off.",
    )
    prefill_dtype: PrefillDType = Field(
        "model",
        description="What prefill calls (and encoders) compute their matmuls in: 'model', the "
        "model's dtype; 'bfloat16', under autocast on a float32 model, while keys, values and "
        "decoding steps stay float32. On a CPU with bfloat16 instructions (AVX512-BF16, AMX) a "
        "prefill takes about half the time; it can change an answer's tokens against float32 "
        "(bench/RESULTS.md, 'Prefill in bfloat16').",
    )

    # security
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for mutating routes; unset means open."
    )
    api_token: SecretStr | None = Field(
        None, description="Bearer token for /ask; unset means open."
    )
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="Largest request body accepted.")
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS; empty means CORS off."
    )

    # live document updates (POST/DELETE /documents, app/retrieval/live.py)
    max_documents_per_request: int = Field(
        64, ge=1, description="Most documents one POST /documents may add or replace."
    )
    max_document_chars: int = Field(
        200_000, ge=1, description="Longest document text accepted by POST /documents."
    )
    compact_log_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="An index whose update log passes this many bytes is compacted into a new "
        "snapshot after the request (also at shutdown and by POST /index/{name}/compact).",
    )
    compact_log_records: int = Field(1000, ge=1, description="... or this many update records.")

    # server
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    log_level: str = "info"
    log_json: bool = Field(False, description="One JSON object per log line.")
    shutdown_drain_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM, how long /ready says 503 while /ask is still answered, "
        "before the socket closes (Ctrl-C skips it).",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="Then how long admitted requests get to finish."
    )

    # the fleet: replicas on one PostgreSQL (docs/deploy.md)
    store: Literal["faiss", "postgres"] = Field(
        "faiss",
        description="Where passages, adapter registrations and the active index live: faiss "
        "(this process: index folders and memory) or postgres (LORAG_DATABASE_URL, shared by "
        "every replica).",
    )
    database_url: SecretStr | None = Field(
        None,
        description="postgresql:// URI of the database (LORAG_STORE=postgres); its password "
        "never appears in logs, errors or /ready.",
    )
    database_timeout_s: float = Field(
        5.0, gt=0, description="Longest wait for a database connection before a 503."
    )
    fleet_recheck_s: float = Field(
        5.0,
        gt=0,
        description="How often a replica re-reads the shared registrations besides LISTEN/NOTIFY "
        "(a notification sent while it was reconnecting is lost).",
    )

    # the Postgres store's queries and new collections (app/retrieval/pg_search.py, pg_schema.py;
    # measured in bench/RESULTS.md, "The Postgres store against FAISS")
    pg_ef_search: int = Field(
        100,
        ge=1,
        le=1000,
        description="LORAG_STORE=postgres: HNSW candidate list per query (hnsw.ef_search, at "
        "least top_k is used); higher: better recall, slower.",
    )
    pg_precision: Literal["vector", "halfvec"] = Field(
        "vector",
        description="LORAG_STORE=postgres: what a new collection's HNSW index holds: vector "
        "(float32) or halfvec (float16, about half the index bytes); scores are computed on the "
        "float32 vectors either way. An existing collection keeps the precision it was built with.",
    )
    pg_hnsw_m: int = Field(
        16,
        ge=2,
        le=100,
        description="LORAG_STORE=postgres: a new collection's HNSW graph degree (pgvector's m); "
        "higher: better recall at a given ef_search, a bigger and slower-built index.",
    )
    pg_ef_construction: int = Field(
        64,
        ge=4,
        le=1000,
        description="LORAG_STORE=postgres: a new collection's HNSW build candidate list "
        "(pgvector's ef_construction, at least 2 * LORAG_PG_HNSW_M); the default graph caps "
        "recall@10 near 0.91 on the 1M benchmark (bench/RESULTS.md); higher: a slower build. "
        "An existing collection keeps the graph it was built with.",
    )
    pg_exact: bool = Field(
        False,
        description="LORAG_STORE=postgres: answer every query by an exact scan (no HNSW index "
        "scan): exact results, a scan of every passage per query.",
    )

    # adapter residency (app/lora/residency.py)
    adapter_memory_bytes: int | None = Field(
        None,
        ge=0,
        description="Budget for resident LoRA weights in bytes (in the model's dtype); over it, "
        "least recently used unpinned idle adapters are evicted. 0 or unset: unlimited.",
    )
    lazy_load_adapters: bool = Field(
        True,
        description="An /ask naming an adapter that is not loaded loads adapters_dir/<name> "
        "if that folder exists.",
    )
    merge_single_adapter: bool = Field(
        False,
        description="While exactly one adapter is loaded and every request asks for it, merge "
        "it into the base weights (no LoRA latency); unmerged for any other row.",
    )

    @model_validator(mode="after")
    def _hnsw_build_fits(self) -> Settings:
        if self.pg_ef_construction < 2 * self.pg_hnsw_m:  # pgvector refuses the index otherwise
            raise ValueError(
                f"LORAG_PG_EF_CONSTRUCTION ({self.pg_ef_construction}) must be at least "
                f"2 * LORAG_PG_HNSW_M ({2 * self.pg_hnsw_m})"
            )
        return self

    # the components' configs ------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.index_dir / self.index_name

    @property
    def encoder_spec(self) -> EncoderSpec:
        from app.retrieval.config import EncoderSpec

        return EncoderSpec(self.encoder, self.encoder_kind, self.device, self.dpr_context_encoder)

    @property
    def generator_spec(self) -> GeneratorSpec:
        return GeneratorSpec(self.generator, self.cache_dir, self.device, self.dtype)

    @property
    def search(self) -> AnnSpec:
        """The index kind and search parameters (LORAG_INDEX_TYPE, LORAG_HNSW_*, LORAG_IVF_*)."""
        from app.retrieval.ann import AnnSpec

        return AnnSpec(
            kind=self.index_type,
            hnsw_m=self.hnsw_m,
            ef_construction=self.hnsw_ef_construction,
            ef_search=self.hnsw_ef_search,
            nlist=self.ivf_nlist,
            nprobe=self.ivf_nprobe,
            pq_m=self.pq_m,
        )

    @property
    def decoding(self) -> DecodingConfig:
        """The RAG modes' decoding, one object for the whole-batch decoder and the step batch."""
        return DecodingConfig(
            num_beams=self.num_beams,
            min_prior=self.min_prior,
            prefix_cache_bytes=self.prefix_cache_bytes,
            prefill_dtype=self.prefill_dtype,
        )

    @property
    def prompts(self) -> PromptConfig:
        """How the generator lays out its prompts; the service lists passages the same way."""
        return PromptConfig(concat_order=self.concat_order)

    @property
    def abstention(self) -> AbstainConfig:
        return AbstainConfig(
            enabled=self.abstain,
            min_score=self.abstain_min_score,
            min_support=self.abstain_min_support,
        )

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            batch_wait_ms=self.batch_wait_ms,
            expect_wait_ms=self.expect_wait_ms,
            step_batching=self.step_batching,
            prefill_tokens_per_step=self.prefill_tokens_per_step,
        )

    @property
    def pg_search(self) -> PgSearchConfig:
        """How the Postgres store answers queries (LORAG_PG_EF_SEARCH, LORAG_PG_EXACT)."""
        from app.retrieval.pg_search import PgSearchConfig

        return PgSearchConfig(exact=self.pg_exact, ef_search=self.pg_ef_search)

    @property
    def pg_index(self) -> PgIndexSpec:
        """How the Postgres store builds a new collection's HNSW index (LORAG_PG_PRECISION,
        LORAG_PG_HNSW_M, LORAG_PG_EF_CONSTRUCTION)."""
        from app.retrieval.pg_schema import PgIndexSpec

        return PgIndexSpec(
            precision=self.pg_precision, m=self.pg_hnsw_m, ef_construction=self.pg_ef_construction
        )

    @property
    def database(self) -> DatabaseConfig | None:
        """The database of LORAG_STORE=postgres (None without LORAG_DATABASE_URL)."""
        if self.database_url is None:
            return None
        from app.db.config import DatabaseConfig

        return DatabaseConfig(self.database_url, connect_timeout_s=self.database_timeout_s)

    @property
    def residency(self) -> ResidencyPolicy:
        from app.lora.residency import ResidencyPolicy

        return ResidencyPolicy.of(
            self.adapter_memory_bytes,
            lazy_load=self.lazy_load_adapters,
            merge_single=self.merge_single_adapter,
        )

    @property
    def update_limits(self) -> UpdateLimits:
        from app.retrieval.updates import UpdateLimits

        return UpdateLimits(self.max_documents_per_request, self.max_document_chars)

    @property
    def compaction(self) -> CompactionPolicy:
        from app.retrieval.manager import CompactionPolicy

        return CompactionPolicy(self.compact_log_bytes, self.compact_log_records)

    @property
    def security(self) -> SecurityConfig:
        return SecurityConfig(
            self.admin_token, self.api_token, self.max_body_bytes, tuple(self.cors_origins)
        )

    @property
    def server(self) -> ServerConfig:
        return ServerConfig(
            host=self.host,
            port=self.port,
            log_level=self.log_level,
            drain_s=self.shutdown_drain_s,
            grace_s=self.shutdown_grace_s,
        )
