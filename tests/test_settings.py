"""Settings: the flat LORAG_* surface, and the per-component configs built from it.

Every environment name and every `Settings(field=value)` keyword stays what it was; what each
component takes is its own frozen config, which refuses a bad value and names the field.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
from pydantic import SecretStr

from app.engine.config import EngineConfig
from app.generation.config import DecodingConfig, GeneratorSpec
from app.retrieval.config import EncoderSpec
from app.settings import SecurityConfig, ServerConfig, Settings
from app.training.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]


def test_environment_names_reach_the_component_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "LORAG_MAX_BATCH_SIZE": "3",
        "LORAG_BATCH_WAIT_MS": "7.5",
        "LORAG_EXPECT_WAIT_MS": "11",
        "LORAG_STEP_BATCHING": "false",
        "LORAG_PREFILL_TOKENS_PER_STEP": "0",
        "LORAG_NUM_BEAMS": "4",
        "LORAG_MIN_PRIOR": "0.05",
        "LORAG_ENCODER": "some/encoder",
        "LORAG_ENCODER_KIND": "dpr",
        "LORAG_DPR_CONTEXT_ENCODER": "some/ctx",
        "LORAG_DEVICE": "cuda:1",
        "LORAG_GENERATOR": "some/generator",
        "LORAG_DTYPE": "bfloat16",
        "LORAG_PREFIX_CACHE_BYTES": "4096",
        "LORAG_PREFILL_DTYPE": "bfloat16",
        "LORAG_CACHE_DIR": "/tmp/lorag-cache",
        "LORAG_INDEX_TYPE": "hnsw",
        "LORAG_HNSW_M": "16",
        "LORAG_HNSW_EF_SEARCH": "99",
        "LORAG_IVF_NPROBE": "7",
        "LORAG_ADAPTER_MEMORY_BYTES": "0",
        "LORAG_MERGE_SINGLE_ADAPTER": "true",
        "LORAG_MAX_DOCUMENTS_PER_REQUEST": "9",
        "LORAG_COMPACT_LOG_RECORDS": "12",
        "LORAG_ADMIN_TOKEN": "sesame",
        "LORAG_CORS_ORIGINS": '["https://a.example"]',
        "LORAG_PORT": "8123",
        "LORAG_SHUTDOWN_DRAIN_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    s = Settings()

    assert s.engine == EngineConfig(3, 7.5, 11.0, False, 0)
    assert s.decoding == DecodingConfig(
        num_beams=4, min_prior=0.05, prefix_cache_bytes=4096, prefill_dtype="bfloat16"
    )
    assert s.encoder_spec == EncoderSpec("some/encoder", "dpr", "cuda:1", "some/ctx")
    assert s.generator_spec == GeneratorSpec(
        "some/generator", Path("/tmp/lorag-cache"), "cuda:1", "bfloat16"
    )
    search = s.search
    assert (search.kind, search.hnsw_m, search.ef_search, search.nprobe) == ("hnsw", 16, 99, 7)
    residency = s.residency
    assert residency.memory_budget is None and residency.merge_single  # 0: unlimited
    assert s.update_limits.max_documents == 9
    assert s.compaction.max_log_records == 12
    security = s.security
    assert security.admin_token is not None
    assert security.admin_token.get_secret_value() == "sesame"
    assert security.cors_origins == ("https://a.example",)
    assert (s.server.port, s.server.drain_s) == (8123, 0.0)


def test_keyword_construction_keeps_the_flat_names(tmp_path: Path) -> None:
    s = Settings(
        index_dir=tmp_path,
        index_name="facts",
        adapters_dir=tmp_path / "adapters",
        max_batch_size=2,
        num_beams=2,
        max_new_tokens=8,
        top_k=3,
        generator="tiny",
    )
    assert s.index_path == tmp_path / "facts"
    assert s.engine.max_batch_size == 2 and s.decoding.num_beams == 2

    from app.cli import training_config

    training = training_config(s)
    assert training == TrainingConfig(
        adapters_dir=tmp_path / "adapters",
        cache_dir=s.cache_dir,
        store=training.store,
        encoder=s.encoder_spec,
        base="tiny",
        top_k=3,
        answer_reserve=8,
    )


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: EngineConfig(max_batch_size=0), "max_batch_size"),
        (lambda: EngineConfig(batch_wait_ms=-1), "batch_wait_ms"),
        (lambda: EngineConfig(expect_wait_ms=float("nan")), "expect_wait_ms"),
        (lambda: EngineConfig(prefill_tokens_per_step=-1), "prefill_tokens_per_step"),
        (lambda: DecodingConfig(num_beams=0), "num_beams"),
        (lambda: DecodingConfig(min_prior=1.0), "min_prior"),
        (lambda: DecodingConfig(prefill_dtype="float16"), "prefill_dtype"),  # type: ignore[arg-type]
        (lambda: GeneratorSpec("default", Path("c"), dtype="int8"), "dtype"),  # type: ignore[arg-type]
        (lambda: EncoderSpec(""), "encoder spec"),
        (lambda: ServerConfig(port=0), "port"),
        (lambda: ServerConfig(grace_s=-1), "grace_s"),
        (lambda: SecurityConfig(max_body_bytes=0), "max_body_bytes"),
        (
            lambda: TrainingConfig(Path("a"), Path("c"), lambda _: None, EncoderSpec(), top_k=0),
            "top_k",
        ),
    ],
)
def test_configs_refuse_bad_values_by_name(make, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make()


def test_configs_are_frozen() -> None:
    config = Settings().engine
    with pytest.raises(FrozenInstanceError):
        config.max_batch_size = 1  # type: ignore[misc]


def test_security_config_keeps_the_token_secret() -> None:
    security = Settings(api_token=SecretStr("hush")).security
    assert "hush" not in repr(security)


def test_reading_settings_loads_no_model_library() -> None:
    """`lorag --help` and `lorag adapter list` read settings; the configs of the engine and
    the generator must not pull torch or faiss in with them."""
    code = (
        "import sys; from app.settings import Settings; s = Settings(); s.engine; s.decoding; "
        "s.generator_spec; s.encoder_spec; s.security; s.server; "
        "print(sorted(m for m in ('torch', 'faiss', 'transformers') if m in sys.modules))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip() == "[]"
