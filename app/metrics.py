"""Prometheus metrics, one registry per app (tests build many apps in one process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from app.generation.prefix_cache import PrefixCache
    from app.lora.registry import AdapterRegistry

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lorag_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "lorag_http_request_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ask_latency = Histogram(
            "lorag_ask_seconds",
            "/ask latency by adapter and mode",
            ["adapter", "mode"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter(
            "lorag_generated_tokens",
            "Tokens generated for /ask answers, by adapter and mode",
            ["adapter", "mode"],
            registry=r,
        )
        self.citations_moved = Counter(
            "lorag_citations_moved",
            "Citation marks [n] the citation check moved to the passage holding what they cite, "
            "by adapter and mode (app/generation/citations.py)",
            ["adapter", "mode"],
            registry=r,
        )
        self.batch_size = Histogram(
            "lorag_batch_rows",
            "Rows per generation batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "lorag_batch_seconds", "Generation time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "lorag_time_to_first_token_seconds",
            "Step batch: from a request reaching the engine to its first token (its prefill)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.token_gap = Histogram(
            "lorag_token_gap_seconds",
            "Step batch: time between two tokens of the running answers (a decoding step, and "
            "the joiners' prefill before it)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("lorag_queue_depth", "Items waiting for the model", registry=r)
        self.running_rows = Gauge(
            "lorag_running_rows",
            "Rows in the step batch, decoding now (RAG-Token: one per passage)",
            registry=r,
        )
        self.adapter_ops = Counter(
            "lorag_adapter_operations", "Adapter loads and unloads", ["op", "outcome"], registry=r
        )
        self.prefix_prompt_tokens = Gauge(
            "lorag_prefix_cache_prompt_tokens",
            "Prompt tokens of rows that looked in the prefix cache (since start)",
            registry=r,
        )
        self.prefix_reused_tokens = Gauge(
            "lorag_prefix_cache_reused_tokens",
            "Of those, tokens whose keys and values (encoder-decoders: encoder output) came from "
            "the cache (hit rate: the ratio); a climbed token counts the share of layers it took",
            registry=r,
        )
        self.prefix_climbed_tokens = Gauge(
            "lorag_prefix_cache_climbed_tokens",
            "Tokens whose layers below the adapters' came from another adapter's (or the "
            "base's) blocks, the upper layers computed on the kept hidden states",
            registry=r,
        )
        self.prefix_bytes = Gauge(
            "lorag_prefix_cache_bytes", "Keys and values held by the prefix cache", registry=r
        )
        self.prefix_evictions = Gauge(
            "lorag_prefix_cache_evictions",
            "Blocks (encoder-decoders: encoder outputs) evicted for the byte budget",
            registry=r,
        )
        self.adapters_resident = Gauge("lorag_adapters_resident", "Loaded adapters", registry=r)
        self.adapter_bytes = Gauge(
            "lorag_adapter_bytes_resident", "Bytes of loaded adapter weights", registry=r
        )
        self.adapter_evictions = Counter(
            "lorag_adapter_evictions", "Adapters evicted to fit the memory budget", registry=r
        )
        self._evictions_seen = 0
        self.index_passages = Gauge(
            "lorag_index_passages", "Passages in the active index (what /ask reads)", registry=r
        )
        self.named_index_passages = Gauge(
            "lorag_named_index_passages", "Passages per loaded index", ["index"], registry=r
        )
        self.index_pending_updates = Gauge(
            "lorag_index_pending_updates",
            "Update-log records not yet compacted into the snapshot, per loaded index",
            ["index"],
            registry=r,
        )

    def observe_index(self, name: str, passages: int, pending: int, *, active: bool) -> None:
        self.named_index_passages.labels(name).set(passages)
        self.index_pending_updates.labels(name).set(pending)
        if active:
            self.index_passages.set(passages)

    def observe_batch(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.batch_seconds.observe(seconds)

    def observe_registry(self, registry: AdapterRegistry) -> None:
        """Resident adapters, their bytes, and evictions so far (lazy loads evict too)."""
        infos = registry.list()
        self.adapters_resident.set(len(infos))
        self.adapter_bytes.set(sum(i.resident_bytes for i in infos))
        self.record_evictions(registry.evictions)

    def record_evictions(self, total: int) -> None:
        """Advance the eviction counter to the registry's running total."""
        if total > self._evictions_seen:
            self.adapter_evictions.inc(total - self._evictions_seen)
            self._evictions_seen = total

    def observe_prefixes(self, cache: PrefixCache | None) -> None:
        if cache is None:
            return
        self.prefix_prompt_tokens.set(cache.stats.looked_up)
        self.prefix_reused_tokens.set(cache.stats.reused)
        self.prefix_climbed_tokens.set(cache.stats.climbed)
        self.prefix_bytes.set(cache.bytes)
        self.prefix_evictions.set(cache.stats.evictions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
