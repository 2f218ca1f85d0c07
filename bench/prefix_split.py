"""Prefix blocks shared across adapters on the real model: exactness, and the prefill they save.

The default generator (SmolLM2-135M-Instruct) with the shipped adapters, which change its last
12 of 30 layers, and the demo index: --requests Zipf requests (bench/prefix_reuse.py's traffic,
adapters taking turns, concat, --top-k, --max-new-tokens) answered with the cache off, then with
the cache on in two arms, blocks shared below the adapters' layers (as served) and blocks whole
per adapter (as before), one at a time and then all in one join. Printed per arm: whether every
answer equals the cache off, the share of prompt tokens reused (a climbed token counts 18/30),
tokens climbed, and the prefill seconds of the timed pass (--rounds rounds alternating the arms,
medians); last, shared/whole.

    .venv/bin/python -m bench.prefix_split [--requests 48] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from app.contracts import GenRow
from app.generation.config import DecodingConfig
from app.generation.modes.base import Answer
from app.generation.step_batch import StepBatch
from app.settings import Settings
from app.wiring import Components, load_components
from bench.prefix_reuse import draws, question_set

ADAPTERS = (None, "concise", "cited")
MIB = 1024 * 1024


def answers(batch: StepBatch, rows: list[GenRow], together: bool) -> list[Answer]:
    """Every row's answer, one join at a time or all in one join."""
    done: dict[int, Answer] = {}
    groups = [list(range(len(rows)))] if together else [[i] for i in range(len(rows))]
    for group in groups:
        done.update(batch.join([rows[i] for i in group], group))  # type: ignore[arg-type]
        while len(batch):
            done.update(batch.step())  # type: ignore[arg-type]
    return [done[i] for i in range(len(rows))]


def with_adapters(adapters: Sequence[str | None]) -> tuple[Components, list[str | None]]:
    """The default components with the shipped adapters installed, and each adapter's PEFT name
    (None: the base), as a GenRow names it."""
    parts = load_components(Settings())
    for name in adapters:
        if name and name not in parts.registry:
            parts.registry.install(name, parts.registry.prepare(name))
    return parts, [parts.registry.peft_name(a) if a else None for a in adapters]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--cache-mib", type=int, default=3072)
    args = ap.parse_args()
    parts, names = with_adapters(ADAPTERS)
    gen = parts.generator
    questions = draws(question_set(300), args.requests, 1.1, seed=0)
    hits = parts.retriever.retrieve(questions, args.top_k)
    rows = [
        GenRow(q, [h.passage for h in hs], names[i % 3], args.max_new_tokens)
        for i, (q, hs) in enumerate(zip(questions, hits, strict=True))
    ]
    want = answers(StepBatch(gen), rows, together=False)
    on = DecodingConfig(prefix_cache_bytes=args.cache_mib * MIB)
    split = StepBatch._split
    seconds: dict[str, list[float]] = {"shared": [], "whole": []}
    for r in range(args.rounds):
        for arm in ("shared", "whole") if r % 2 == 0 else ("whole", "shared"):
            if arm == "whole":
                StepBatch._split = lambda self: (0, 0)  # type: ignore[method-assign]
            try:
                batch = StepBatch(gen, on)
                start = time.perf_counter()
                alone = answers(batch, rows, together=False)
                seconds[arm].append(time.perf_counter() - start)
                joined = answers(batch, rows, together=True)
            finally:
                StepBatch._split = split  # type: ignore[method-assign]
            cache = batch.prefixes
            assert cache is not None
            equal = sum(
                a.ids == w.ids and b.ids == w.ids
                for a, b, w in zip(alone, joined, want, strict=True)
            )
            prompt = sum(a.prompt_tokens for a in alone)
            reused = sum(a.reused_tokens for a in alone)
            print(
                f"round {r + 1} {arm:6s}: answers equal to the cache off {equal}/{len(rows)} "
                f"(one at a time and joined); first pass reused {reused / prompt:.0%}, "
                f"climbed {cache.stats.climbed} tokens, split {cache.split}/{cache.layers}; "
                f"{seconds[arm][-1]:.1f} s",
                flush=True,
            )
    shared, whole = (statistics.median(seconds[a]) for a in ("shared", "whole"))
    print(f"first pass, {len(rows)} one at a time: shared {shared:.1f} s, whole {whole:.1f} s")
    print(f"shared/whole: {shared / whole:.2f}x the time")


if __name__ == "__main__":
    main()
