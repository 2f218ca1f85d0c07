"""Build the heavy components from settings. Shared by the server lifespan and the CLI."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from app.contracts import GenRow
from app.errors import IndexNotFound
from app.generation.backends import Generator, sync_batched_lora
from app.generation.loading import load_generator, prepare_default_generator
from app.lora.registry import AdapterRegistry
from app.lora.residency import ResidencyPolicy
from app.retrieval.ann import spec_from_settings
from app.retrieval.builder import build_index
from app.retrieval.encoders import TextEncoder, load_encoder
from app.retrieval.indexes import IndexCatalog
from app.retrieval.retriever import Retriever
from app.retrieval.store import IndexOutdated, PassageIndex
from app.settings import DEFAULT, Settings

log = logging.getLogger(__name__)

DEMO_INDEX = "demo"
DEMO_SOURCE = Path("sources") / "demo.jsonl"  # under the index root, beside the built indexes


@dataclass
class Components:
    encoder: TextEncoder
    index: PassageIndex
    retriever: Retriever
    generator: Generator
    registry: AdapterRegistry
    load_seconds: dict[str, float]
    catalog: IndexCatalog  # the named indexes; `index` is the one active at start


def load_components(settings: Settings) -> Components:
    """Load encoder, index and generator; refuse an index built with another encoder."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    times: dict[str, float] = {}
    t = time.perf_counter()
    encoder = load_encoder(
        settings.encoder,
        settings.encoder_kind,
        device=settings.device,
        context_spec=settings.dpr_context_encoder,
    )
    times["encoder"] = time.perf_counter() - t
    t = time.perf_counter()
    catalog = IndexCatalog(
        settings.index_dir,
        settings.index_name,
        fingerprint=encoder.fingerprint,
        search=spec_from_settings(settings),
    )
    index = catalog.resolve(None)  # the active index loads now: a bad one fails the start
    times["index"] = time.perf_counter() - t
    t = time.perf_counter()
    generator = load_generator(
        settings.generator,
        device=settings.device,
        dtype=settings.dtype,
        cache_dir=settings.cache_dir,
    )
    times["generator"] = time.perf_counter() - t
    registry = AdapterRegistry(
        generator,
        settings.adapters_dir,
        on_change=lambda model: sync_batched_lora(generator, model),
        policy=ResidencyPolicy.of(
            settings.adapter_memory_bytes,
            lazy_load=settings.lazy_load_adapters,
            merge_single=settings.merge_single_adapter,
        ),
    )
    t = time.perf_counter()
    _warm_up(encoder, index, generator)
    times["warm_up"] = time.perf_counter() - t
    log.info(
        "loaded encoder %s, index %s (%d passages), generator %s in %s",
        encoder.fingerprint,
        settings.index_path,
        len(index),
        generator.model_id,
        {k: round(v, 2) for k, v in times.items()},
    )
    retriever = Retriever(encoder, catalog)
    return Components(encoder, index, retriever, generator, registry, times, catalog)


def _warm_up(encoder: TextEncoder, index: PassageIndex, generator: Generator) -> None:
    """One tiny pass through each model before /ready says yes, so the first request does not
    pay for lazy initialization (thread pools, kernel selection, tokenizer caches)."""
    hits = Retriever(encoder, index).retrieve(["warm-up"], 1)[0]
    generator.generate([GenRow("warm-up", [h.passage for h in hits], None, 1)])


def prepare(settings: Settings, *, demo_source: Path | None = None) -> None:
    """First-run setup for the embedded default: convert the generator, build the demo index."""
    if settings.generator == DEFAULT:
        prepare_default_generator(settings.cache_dir)
    try:
        PassageIndex.load(settings.index_path)
        return
    except IndexNotFound:
        if settings.index_name != DEMO_INDEX:
            raise
    except IndexOutdated as exc:  # built by an older lorag: the demo index is ours to rebuild
        if settings.index_name != DEMO_INDEX:
            raise
        log.warning("rebuilding the demo index: %s", exc)
    demo_source = demo_source or settings.index_dir / DEMO_SOURCE
    log.info("building the demo index from %s into %s", demo_source, settings.index_path)
    encoder = load_encoder(
        settings.encoder,
        settings.encoder_kind,
        device=settings.device,
        context_spec=settings.dpr_context_encoder,
    )
    build_index([demo_source], encoder, settings.index_path, spec=spec_from_settings(settings))
