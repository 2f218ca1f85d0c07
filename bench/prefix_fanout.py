"""One question under several adapters at once: does a joiner climb from what another adapter's
joiner computes in the same join?

The default generator (SmolLM2-135M-Instruct) with the shipped adapters (their last 12 of 30
layers) and the demo index. Each of --questions distinct questions is asked under the base and
every shipped adapter in one join (a fan-out: an A/B of adapters, or one question routed to
several tasks), into a fresh step batch with the prefix cache on. Two arms, alternating
(A B, B A, ...) for --rounds rounds:
- across: the step batch as it is: a joiner whose prompt an earlier joiner under another
  adapter starts with waits for a second prefill call and climbs from its lower 18 layers;
- same-adapter: the rule before, followers only behind a joiner under their own adapter
  (reproduced here, `same_adapter_followers`).
Printed per arm: the seconds the joins took (prefill, and the climbs), the share of prompt
tokens reused, and whether every answer equals the cache off; medians, and across/same last.

    .venv/bin/python -m bench.prefix_fanout [--questions 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

from app.contracts import GenRow
from app.generation import step_batch
from app.generation.config import DecodingConfig
from app.generation.modes.base import Answer
from app.generation.prefix_cache import shared_blocks
from app.generation.step_batch import StepBatch
from bench.prefix_reuse import question_set
from bench.prefix_split import with_adapters

ADAPTERS = (None, "concise", "cited", "grounded")
MIB = 1024 * 1024


def same_adapter_followers(self: StepBatch, requests: Sequence[step_batch.Request]) -> set[int]:
    """StepBatch._followers before joiners climbed from other adapters' rows (b6b4afb)."""
    if not self.host.family.reuses_prefixes or len(requests) < 2:
        return set()
    cache = self._live_cache()
    if cache is None:
        return set()
    ids = [p for r in requests for p in r.prompts]
    names = step_batch._row_names(requests)
    shared = shared_blocks(names, ids)
    gain = [
        max(0, s - cache.covered(n, p)) if s else 0
        for n, p, s in zip(names, ids, shared, strict=True)
    ]
    per = step_batch._per_request(requests, gain)
    return {i for i, g in enumerate(per) if g >= step_batch.CALL_COST_TOKENS}


def fan_out(batch: StepBatch, rows: list[GenRow], width: int) -> tuple[list[Answer], float]:
    """Each question's rows (width of them) in one join, decoded to the end; the answers and
    the seconds the joins took."""
    done: dict[int, Answer] = {}
    joining = 0.0
    for start in range(0, len(rows), width):
        keys = list(range(start, start + width))
        t = time.perf_counter()
        done.update(batch.join([rows[i] for i in keys], keys))  # type: ignore[arg-type]
        joining += time.perf_counter() - t
        while len(batch):
            done.update(batch.step())  # type: ignore[arg-type]
    return [done[i] for i in range(len(rows))], joining


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    args = ap.parse_args()
    parts, names = with_adapters(ADAPTERS)
    gen = parts.generator
    questions = question_set(300)[: args.questions]
    hits = parts.retriever.retrieve(questions, args.top_k)
    rows = [
        GenRow(q, [h.passage for h in hs], name, args.max_new_tokens)
        for q, hs in zip(questions, hits, strict=True)
        for name in names
    ]
    want, _ = fan_out(StepBatch(gen), rows, len(names))
    on = DecodingConfig(prefix_cache_bytes=3072 * MIB)
    across = StepBatch._followers
    seconds: dict[str, list[float]] = {"across": [], "same": []}
    for r in range(args.rounds):
        for arm in ("across", "same") if r % 2 == 0 else ("same", "across"):
            if arm == "same":
                StepBatch._followers = same_adapter_followers  # type: ignore[method-assign]
            try:
                batch = StepBatch(gen, on)
                got, took = fan_out(batch, rows, len(names))
            finally:
                StepBatch._followers = across  # type: ignore[method-assign]
            seconds[arm].append(took)
            equal = sum(a.ids == w.ids for a, w in zip(got, want, strict=True))
            reused = sum(a.reused_tokens for a in got) / sum(a.prompt_tokens for a in got)
            cache = batch.prefixes
            assert cache is not None
            print(
                f"round {r + 1} {arm:6s}: joins {took:.2f} s; prompt tokens reused {reused:.0%}, "
                f"climbed {cache.stats.climbed}; answers equal to the cache off "
                f"{equal}/{len(rows)}",
                flush=True,
            )
    a, s = (statistics.median(seconds[k]) for k in ("across", "same"))
    print(f"{args.questions} questions x {len(names)} adapters: across {a:.2f} s, same {s:.2f} s")
    print(f"across/same: {a / s:.2f}x the join time")


if __name__ == "__main__":
    main()
